#!/bin/bash
# Attempt 35 (L2 bulk prefetch): GPU tests for the new key, then the layer under prefetch variants.
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/35-pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/35-device.txt"
timeout 170 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider -k prefetch -x \
    > "$OUT/35-gpu-tests-prefetch.log" 2>&1
echo "tests rc=$?" >> "$OUT/35-gpu-tests-prefetch.log"
cd benchmarks
timeout 360 python3 compare_configs.py --out "$OUT" --name 35-probe-l2-prefetch \
    --case gemma-2b-ffn:256,512 --case gpt2-ffn:64,128 --case gemma3-270m-ffn:64 \
    --tokens 1,2,4 --fractions 0.1,0.3,1.0 \
    --variant 'P1={"fused": {"PREFETCH": 1}}' \
    --variant 'P2={"fused": {"PREFETCH": 2}}' \
    --variant 'P3={"fused": {"PREFETCH": 3}}' \
    --variant 'R={"router": {"HIDDEN_PREFETCH": 1, "TAIL_PREFETCH": 1}}' \
    --variant 'P3R={"fused": {"PREFETCH": 3}, "router": {"HIDDEN_PREFETCH": 1, "TAIL_PREFETCH": 1}}' \
    > "$OUT/35-probe.log" 2>&1
echo "probe rc=$?" >> "$OUT/35-probe.log"
