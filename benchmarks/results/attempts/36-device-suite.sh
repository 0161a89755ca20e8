#!/bin/bash
# Attempt 36, second call: the whole GPU suite with the H200 file's new T=2-3 TMA tier at d2048.
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/36-pip.log" 2>&1
timeout 560 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider \
    > "$OUT/36-gpu-tests-suite.log" 2>&1
echo "tests rc=$?" >> "$OUT/36-gpu-tests-suite.log"
