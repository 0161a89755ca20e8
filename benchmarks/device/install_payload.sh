#!/bin/bash
# On the GPU machine, in the call that brings the last chunk (make_payload.sh): unpacks the chunks, installs vLLM,
# transformers 5.19 and the other wheels into /root/vsite, this project into the image's python (vLLM finds the
# plugin through its entry point), the SOTU and Brown text into /root/cache (the BBC and task files into /root/vsite) and the GGUF into /root/recipe. Afterwards, in
# this call and every later one of the lease:  export PYTHONPATH=/root/vsite:$PYTHONPATH D2DMOE_CACHE=/root/cache
set -euo pipefail
mkdir -p /root/payload /root/vsite /root/cache /root/recipe
cat /root/stage/chunk.* | tar -xf - -C /root/payload && rm -rf /root/stage
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/vsite /root/payload/whl/*.whl \
  2>&1 | grep -v 'already exists' | tail -3 || true
xz -dc /root/payload/vllm.tar.xz | tar -xf - -C /root/vsite
export PYTHONPATH=/root/vsite:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
tar -xJf /root/payload/sotu.tar.xz -C /root/cache
tar -xJf /root/payload/evaldata.tar.xz -C /root/payload && cp -r /root/payload/cache/. /root/cache/ \
  && cp -r /root/payload/site/. /root/vsite/      # Brown into the cache; the BBC and task files beside vLLM
cp /root/payload/gemma3-270m-q4_k_m.gguf /root/recipe/
python3 -c "import vllm, transformers, torch, triton; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
