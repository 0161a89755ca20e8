#!/bin/bash
# Session 37, fifth call: fp32 layers through the H200 config (its tiles were chosen for bf16 weights):
# test_fp32_models_match_fp64_reference only. Fifth call at the tiles as tuned (37-gpu-tests-fp32-before.log: 8 failed,
# OutOfResources at d2048 T=2-3); sixth call with configs.for_element_size in the fused launcher (37-gpu-tests-fp32.log).
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/37-pip.log" 2>&1
timeout 280 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider -k fp32_models --tb=line \
    > "$OUT/37-gpu-tests-fp32.log" 2>&1
echo "tests rc=$?" >> "$OUT/37-gpu-tests-fp32.log"
