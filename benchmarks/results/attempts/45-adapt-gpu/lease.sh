# session 45's lease: A = the recipe (teacher text 0.5, ReLU) + adapt 240 steps (/root/ad240), both methods;
# B = A's dense + sparsify stages (--sparsified-from, started once A's sparsify stage is done) + adapt 480 steps
# (/root/ad480), tau per layer only. Each report's adapt.before holds its numbers before adapt. Rerun = resume.
# Session 45 (H200): call 1 (after the payload install) reached A's split (call1/*.log: teacher text 120 s to start,
# 1.84M tokens at 20.4k tok/s; sparsify 480 steps alone in 162 s); the machine was taken back during call 2 and
# no other could be started in the device time left, so nothing was measured. Run it again as it is.
export PYTHONPATH=/root/vsite:${PYTHONPATH:-} D2DMOE_CACHE=/root/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
T=${T:-560}; S=$(date +%s)
mkdir -p /root/ad240 /root/logs && cp --update=none /root/recipe/gemma3-270m-q4_k_m.gguf /root/ad240/
run() { timeout $2 python3 benchmarks/gpu_convert_recipe.py --generated 0.5 --no-sweep --minutes 30 \
        --work /root/$1 --out /root/out/$1 "${@:3}" >> $OUT/$1.log 2>&1; echo "$1 rc $?" >> $OUT/$1.log; }
cp /root/logs/*.log $OUT/ 2>/dev/null
run ad240 $T --adapt-steps 240 --methods d2dmoe-per-layer,d2dmoe & A=$!
for i in $(seq 180); do test -f /root/ad240/stages/sparsify/stage.json && break; sleep 3; done
if test -f /root/ad240/stages/sparsify/stage.json && [ $(( T - $(date +%s) + S )) -gt 30 ]; then
  run ad480 $(( T - $(date +%s) + S )) --adapt-steps 480 --methods d2dmoe-per-layer --sparsified-from /root/ad240
fi
wait $A; cp $OUT/*.log /root/logs/
cp -r /root/out/ad240 /root/out/ad480 $OUT/ 2>/dev/null; grep -h " rc \|teacher-text\] {\|perplexity  \|executed" $OUT/*.log
