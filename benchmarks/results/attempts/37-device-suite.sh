#!/bin/bash
# Session 37, first call: the whole GPU suite at 14860d1 (covers the 7c4c278 / 14860d1 mends and
# test_device_config_takes_tma_where_it_says, which had not run on a GPU).
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/37-pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/37-gpu-tests-14860d1.log"
timeout 540 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider \
    >> "$OUT/37-gpu-tests-14860d1.log" 2>&1
echo "tests rc=$?" >> "$OUT/37-gpu-tests-14860d1.log"
