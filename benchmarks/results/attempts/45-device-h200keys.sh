#!/bin/bash
# Session 45 (H100): do the H200 file's keys (programmatic dependent launch, Triton router first layer, one-step
# decode reduction, router prefetch at d2048, the fused/masked/gemm tiers of attempts 17-36) help on the H100,
# whose own file predates them? The layer under the H100 file ("device", first and last) against the whole
# H200 file as an override ("H200"), against it without the H200's fused by_tokens tiers ("H200-notiers"), and with
# the router's tail inside the fused kernel at d2048 ("H200-own": one launch fewer; attempt 10 chose the split tail
# before PDL existed), and with the whole router inside the fused kernel at d768 ("H200-full768": attempt 11 measured
# +0.7 us at GPT-2 T=1 before PDL hid the router launch it saves). Not run in sessions 45 and 46 (no machine could be started); run in session 47 (H100): attempts/47-h100-keys/, docs/kernels.md attempt 39.
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/45-pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/45-device.txt"
# the four overrides, one per line: the H200 file, without its fused tiers, with the d2048 tail inside, with the d768 router inside
mapfile -t VARIANTS < <(python3 - <<'PY'
import copy, json
h200 = json.load(open("kernels/configs/NVIDIA_H200.json"))
h200.pop("_comment")
notiers, own, full768 = copy.deepcopy(h200), copy.deepcopy(h200), copy.deepcopy(h200)
for k in ("fused@d2048e256", "fused@d2048e512"):
    notiers[k].pop("by_tokens")
own["fused@d2048"]["own_router"] = True
full768["fused@d768"].update(own_router=True, full_router=True)
for label, cfg in (("H200", h200), ("H200-notiers", notiers), ("H200-own", own), ("H200-full768", full768)):
    print(f"{label}={json.dumps(cfg)}")
PY
)
cd benchmarks
timeout ${T:-240} python3 compare_configs.py --out "$OUT" --name 45-probe-h200-keys-on-h100 \
    --case gemma-2b-ffn:256 --case gpt2-ffn:64 ${MORE---case gpt2-ffn:128 --case gemma3-270m-ffn:64} \
    --tokens ${TOKENS:-1,4} --fractions ${FRACTIONS:-0.3,1.0} "${VARIANTS[@]/#/--variant=}" > "$OUT/45-probe.log" 2>&1
echo "probe rc=$?" >> "$OUT/45-probe.log"
cat "$OUT/45-probe.log"
