#!/bin/bash
# Attempt 38, third probe: whole slices round robin (ALIGNED: the fused kernel's per-program work,
# with the router inside and the reduction after a barrier) against the device config; the barrier
# now one acq_rel add + ld.acquire polls per program, the selection copy skipped at T = 1.
# (ALIGNED was the switch to round-robin slices; they are the only mode since, the key is gone.)
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/38-pip3.log" 2>&1
timeout 150 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider -k "persistent" -x \
    > "$OUT/38-gpu-tests-aligned.log" 2>&1
echo "tests rc=$?" >> "$OUT/38-gpu-tests-aligned.log"
P='"max_tokens": 4, "pdl": true'
A="$P, \"ALIGNED\": true"
cd benchmarks
timeout 330 python3 compare_configs.py --out "$OUT" --name 38-probe-persistent-aligned \
    --case gemma-2b-ffn:256 --case gpt2-ffn:64 --case gemma3-270m-ffn:64 --tokens 1,2 --fractions 0.1,0.3,1.0 \
    --variant "PERS={\"persistent\": {$P}}" \
    --variant "A64={\"persistent\": {$A, \"BLOCK_R\": 64, \"BLOCK_K\": 128, \"BLOCK_N\": 256, \"num_stages\": 4}}" \
    --variant "A32={\"persistent\": {$A, \"BLOCK_R\": 32, \"BLOCK_K\": 256, \"BLOCK_N\": 256, \"num_stages\": 3}}" \
    --variant "A16={\"persistent\": {$A, \"BLOCK_R\": 16, \"BLOCK_K\": 256, \"BLOCK_N\": 256, \"num_stages\": 4}}" \
    --variant "A64T={\"persistent\": {$A, \"BLOCK_R\": 64, \"BLOCK_K\": 128, \"BLOCK_N\": 256, \"num_stages\": 4, \"TAIL_BLOCK_W\": 256, \"HIDDEN_BLOCK_K\": 512}}" \
    > "$OUT/38-probe-aligned.log" 2>&1
echo "aligned rc=$?" >> "$OUT/38-probe-aligned.log"
