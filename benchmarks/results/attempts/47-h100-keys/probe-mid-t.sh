#!/bin/bash
# Session 47 (H100): the H200 file's small-T keys (fused.pdl + REDUCE_BLOCK_S 256, the Triton router first layer up
# to 128 tokens with PDL, router@d2048 prefetch, fused@d2048 by_tokens tiers; small-t-keys.json) at the token counts
# the first probe (45-device-h200keys.sh, T=1 and 4) did not reach, before they go into the H100 file.
cd "$(dirname "$0")/../../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/47-pip.log" 2>&1
cd benchmarks
timeout ${T:-150} python3 compare_configs.py --out "$OUT" --name 47-probe-h100-small-t-keys-mid-t \
    --case gemma-2b-ffn:256 --case gpt2-ffn:64 --case gemma3-270m-ffn:64 --tokens ${TOKENS:-16,64,128} --fractions 0.3 \
    "--variant=H200-small-T-keys=$(cat results/attempts/47-h100-keys/small-t-keys.json)" > "$OUT/47-probe.log" 2>&1
echo "probe rc=$?" >> "$OUT/47-probe.log"; cat "$OUT/47-probe.log"
