#!/bin/bash
# Attempt 36 (fused decode weight tiles through tensor descriptors, TMA): GPU tests for the new key,
# then the layer under TMA variants (the T=1 tier's stages re-opened: TMA frees ~50 registers).
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/36-pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/36-device.txt"
timeout 170 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider -k tma -x \
    > "$OUT/36-gpu-tests-tma.log" 2>&1
echo "tests rc=$?" >> "$OUT/36-gpu-tests-tma.log"
T3='[3, {"BLOCK_J": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}]'
tier() {  # the d2048 fused keys with the T=1 tier replaced by $1
    echo "\"fused@d2048e256\": {\"by_tokens\": [[1, $1], $T3]}, \"fused@d2048e512\": {\"by_tokens\": [[1, $1], $T3]}"
}
cd benchmarks
timeout 380 python3 compare_configs.py --out "$OUT" --name 36-probe-tma \
    --case gemma-2b-ffn:256,512 --case gpt2-ffn:64 --case gemma3-270m-ffn:64 \
    --tokens 1,2,4 --fractions 0.1,0.3,1.0 \
    --variant 'TMA={"fused": {"TMA": 1}}' \
    --variant "TMA-S5={\"fused\": {\"TMA\": 1}, $(tier '{"BLOCK_K": 128, "num_stages": 5}')}" \
    --variant "TMA-S3={\"fused\": {\"TMA\": 1}, $(tier '{"BLOCK_K": 128, "num_stages": 3}')}" \
    --variant "TMA-K64S6={\"fused\": {\"TMA\": 1}, $(tier '{"BLOCK_K": 64, "num_stages": 6}')}" \
    > "$OUT/36-probe.log" 2>&1
echo "probe rc=$?" >> "$OUT/36-probe.log"
