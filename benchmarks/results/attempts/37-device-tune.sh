#!/bin/bash
# Session 37, second and third calls: tune_kernels inside the H200's own config (candidates timed with the
# device's other keys: PDL, REDUCE_BLOCK_S 256, own_router, tiers; the path under test the one taken at its T;
# the device's current values among the candidates). The written file must keep the d2048 T=2-3 TMA tier.
# Second call: --paths fused (37-tune-fused.log, before the device values were a candidate).
# Third call: --paths fused,decode,grouped (37-tune.log, the device values a candidate, no margin yet).
# Fourth call: the same with the 2% margin over the device values (37-tune-final.log).
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/37-pip.log" 2>&1
cd benchmarks
timeout 540 python3 tune_kernels.py --paths "${1:-fused,decode,grouped}" --out "$OUT/tuned" > "$OUT/37-tune-final.log" 2>&1
echo "tune rc=$?" >> "$OUT/37-tune-final.log"
