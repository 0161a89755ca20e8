#!/bin/bash
# Attempt 36, third call: the kernel benchmark at the committed tree, then T=3 under the tier with and without TMA.
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/36-pip.log" 2>&1
cd benchmarks
D2DMOE_GIT_SHA="$1" timeout 330 python3 bench_kernels.py --out "$OUT" > "$OUT/36-bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/36-bench.log"
T3='{"BLOCK_J": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}'
K="[[1, {\"BLOCK_K\": 128, \"num_stages\": 4}], [3, $T3]]"
timeout 150 python3 compare_configs.py --out "$OUT" --name 36-probe-tma-t3 --case gemma-2b-ffn:256,512 \
    --tokens 2,3 --fractions 0.1,0.3,0.5,1.0 \
    --variant "no-TMA={\"fused@d2048e256\": {\"by_tokens\": $K}, \"fused@d2048e512\": {\"by_tokens\": $K}}" \
    > "$OUT/36-probe-t3.log" 2>&1
echo "probe rc=$?" >> "$OUT/36-probe-t3.log"
