#!/bin/bash
# Attempt 38, fourth probe (the patch 38-balanced-slices.patch on 9669e22+): balanced slices
# (S = min(ceil(n / P), BLOCK_R) rows per program) in the loop form that compiles without spills. Refuted, not kept.
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/38-pip5.log" 2>&1
P='"max_tokens": 4, "pdl": true'
cd benchmarks
timeout 100 python3 compare_configs.py --out "$OUT" --name 38-probe-persistent-balanced \
    --case gemma-2b-ffn:256 --case gpt2-ffn:64 --tokens 1 --fractions 0.1,0.3,1.0 \
    --variant "B64={\"persistent\": {$P, \"BLOCK_R\": 64, \"BLOCK_K\": 128, \"BLOCK_N\": 256, \"num_stages\": 4}}" \
    --variant "B32={\"persistent\": {$P, \"BLOCK_R\": 32, \"BLOCK_K\": 256, \"BLOCK_N\": 256, \"num_stages\": 3}}" \
    > "$OUT/38-probe-balanced.log" 2>&1
echo "probe rc=$?" >> "$OUT/38-probe-balanced.log"
cd ..
timeout 50 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider \
    -k "persistent and (barrier or (fp64 and dtype0 and (shape0 or shape2)))" > "$OUT/38-gpu-tests-balanced.log" 2>&1
echo "tests rc=$?" >> "$OUT/38-gpu-tests-balanced.log"
