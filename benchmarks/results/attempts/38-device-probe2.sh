#!/bin/bash
# Attempt 38, second probe: where the one-launch kernel's time goes (fewer, larger loop steps in
# each phase: router tail / first layer, the up and down streams; smaller row tiles).
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/38-pip2.log" 2>&1
P='"max_tokens": 4, "pdl": true'
cd benchmarks
timeout 300 python3 compare_configs.py --out "$OUT" --name 38-probe-persistent-blocks2 \
    --case gemma-2b-ffn:256 --case gpt2-ffn:64 --tokens 1 --fractions 0.1,0.3,1.0 \
    --variant "PERS={\"persistent\": {$P}}" \
    --variant "TW256={\"persistent\": {$P, \"TAIL_BLOCK_W\": 256, \"HIDDEN_BLOCK_K\": 512}}" \
    --variant "K256N256={\"persistent\": {$P, \"BLOCK_K\": 256, \"BLOCK_N\": 256}}" \
    --variant "K64S5={\"persistent\": {$P, \"BLOCK_K\": 64, \"BLOCK_N\": 64, \"num_stages\": 5}}" \
    --variant "R32={\"persistent\": {$P, \"BLOCK_R\": 32}}" \
    --variant "R16K256={\"persistent\": {$P, \"BLOCK_R\": 16, \"BLOCK_K\": 256, \"BLOCK_N\": 256, \"num_stages\": 4}}" \
    > "$OUT/38-probe-blocks2.log" 2>&1
echo "blocks rc=$?" >> "$OUT/38-probe-blocks2.log"
