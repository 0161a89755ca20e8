# Run in session 47 (H100): benchmarks/results/attempts/47-adapt-steps-h100/ (22.79 at 49.9% after 240 steps, 24.88 before).
# The adapt stage's first GPU measurement in ONE device call, so a machine taken back afterwards loses nothing
# (session 45 lost its run that way between calls): the recipe without teacher text (session 42's "480 steps,
# co-activation": 25.04 at 50% with a tau per layer) + 240 adapt steps, tau per layer only. Estimated on an H200,
# alone on the GPU: load 20 s + sparsify 162 + split 40 + routers 85 + calibrate 25 + adapt ~80 + measure ~20 s,
# ~7.5 min. Run it in the payload's install call:
#   S0=$(date +%s); cp .devcarry/p7/chunk.7 /root/stage/ && bash benchmarks/device/install_payload.sh > $OUT/install.log 2>&1;
#   T=$(( 585 - $(date +%s) + S0 )) bash benchmarks/results/attempts/45-adapt-gpu/lease-one-call.sh
# The report's adapt.before holds the same run's numbers before adapt. Rerun = resume (if the machine is held).
export PYTHONPATH=/root/vsite:${PYTHONPATH:-} D2DMOE_CACHE=/root/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
T=${T:-560}
mkdir -p /root/one /root/logs && cp --update=none /root/recipe/gemma3-270m-q4_k_m.gguf /root/one/
timeout $T python3 benchmarks/gpu_convert_recipe.py --adapt-steps 240 --methods d2dmoe-per-layer --no-sweep \
  --minutes 30 --work /root/one --out /root/out/one >> $OUT/one.log 2>&1; echo "one rc $?" >> $OUT/one.log
cp $OUT/*.log /root/logs/; cp -r /root/out/one $OUT/ 2>/dev/null
grep -h " rc \|perplexity  \|executed\|adapt   \|seconds per" $OUT/one.log
