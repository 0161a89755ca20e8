#!/bin/bash
# Attempt 38 (the whole decode layer in one launch, grid barriers: expert_decode_persistent.py):
# its GPU tests, then the layer under the persistent path and block variants against the device config.
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/38-pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/38-gpu-tests-persistent.log"
timeout 170 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider -k persistent -x \
    >> "$OUT/38-gpu-tests-persistent.log" 2>&1
echo "tests rc=$?" >> "$OUT/38-gpu-tests-persistent.log"
P='"max_tokens": 4, "pdl": true'
cd benchmarks
timeout 200 python3 compare_configs.py --out "$OUT" --name 38-probe-persistent \
    --case gemma-2b-ffn:256,512 --case gpt2-ffn:64 --case gemma3-270m-ffn:64 \
    --tokens 1,2,4 --fractions 0.1,0.3,0.5,1.0 \
    --variant "PERS={\"persistent\": {$P}}" \
    --variant "PHASED={\"persistent\": {$P, \"phased\": true}}" \
    > "$OUT/38-probe.log" 2>&1
echo "probe rc=$?" >> "$OUT/38-probe.log"
timeout 140 python3 compare_configs.py --out "$OUT" --name 38-probe-persistent-blocks \
    --case gemma-2b-ffn:256 --case gpt2-ffn:64 --tokens 1 --fractions 0.1,0.3,1.0 \
    --variant "PERS={\"persistent\": {$P}}" \
    --variant "R128K64={\"persistent\": {$P, \"BLOCK_R\": 128, \"BLOCK_K\": 64}}" \
    --variant "W8={\"persistent\": {$P, \"num_warps\": 8}}" \
    --variant "N256={\"persistent\": {$P, \"BLOCK_N\": 256}}" \
    --variant "K256S2={\"persistent\": {$P, \"BLOCK_K\": 256, \"num_stages\": 2}}" \
    --variant "HW32={\"persistent\": {$P, \"HIDDEN_BLOCK_W\": 32, \"TAIL_BLOCK_W\": 128}}" \
    > "$OUT/38-probe-blocks.log" 2>&1
echo "blocks rc=$?" >> "$OUT/38-probe-blocks.log"
