#!/bin/bash
# Attempt 38, last call: the GPU tests of the one-launch decode kernel as committed (round-robin
# slices only; default blocks 32 x 256 x 256), and the balanced kernel (its down loop now add_down_partial).
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/38-pip4.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/38-gpu-tests-final.log"
timeout 200 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider -k "persistent or balanced or pdl or in_kernel_router" \
    >> "$OUT/38-gpu-tests-final.log" 2>&1
echo "tests rc=$?" >> "$OUT/38-gpu-tests-final.log"
