#!/bin/bash
# On the GPU machine, in the call that brings the last chunk (make_payload.sh): checks that every chunk arrived
# (count and sha256 of the stream), unpacks them, installs vLLM, transformers 5.19 and the other wheels into
# /root/vsite, this project into the image's python (vLLM finds the plugin through its entry point), the SOTU
# and Brown text into /root/cache (the BBC and task files into /root/vsite) and the GGUF into /root/recipe.
# Afterwards, in this call and every later one of the lease:
#   export PYTHONPATH=/root/vsite:$PYTHONPATH D2DMOE_CACHE=/root/cache
set -euo pipefail
mkdir -p /root/payload /root/vsite /root/cache /root/recipe
want=$(cat .devcarry/p*/chunks.txt)               # written by make_payload.sh beside the last chunk
have=$(ls /root/stage/chunk.* | wc -l)
[ "$have" = "$(echo "$want" | cut -d' ' -f1)" ] || { echo "install_payload: $have chunks in /root/stage, want $want"; exit 1; }
[ "$(cat /root/stage/chunk.* | sha256sum | cut -d' ' -f1)" = "$(echo "$want" | cut -d' ' -f2)" ] \
  || { echo "install_payload: the chunks' sha256 differs from make_payload's: copy them again"; exit 1; }
cat /root/stage/chunk.* | tar -xf - -C /root/payload
rm -rf /root/stage
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/vsite /root/payload/whl/*.whl \
  2>&1 | { grep -v 'already exists' || true; } | tail -3
xz -dc /root/payload/vllm.tar.xz | tar -xf - -C /root/vsite
export PYTHONPATH=/root/vsite:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
if [ -f /root/payload/sotu.tar.xz ]; then          # not in a SLIM=1 payload (vLLM and wheels only)
  tar -xJf /root/payload/sotu.tar.xz -C /root/cache
  tar -xJf /root/payload/evaldata.tar.xz -C /root/payload
  cp -r /root/payload/cache/. /root/cache/          # Brown
  cp -r /root/payload/site/. /root/vsite/           # the BBC and task files, found by find_spec, never imported
  cp /root/payload/gemma3-270m-q4_k_m.gguf /root/recipe/
fi
python3 - <<'PY'
import transformers, torch, triton, vllm
import d2dmoe_converter, d2dmoe_vllm  # noqa: F401  (the editable install)
assert transformers.__version__ == "5.19.0", f"transformers {transformers.__version__}: the 5.19 wheel did not install"
print("vllm", vllm.__version__, "transformers", transformers.__version__, "torch", torch.__version__, "triton", triton.__version__)
PY
