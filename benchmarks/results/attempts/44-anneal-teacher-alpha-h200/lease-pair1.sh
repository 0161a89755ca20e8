# session 44's lease: two anneal conversions side by side on one H100 (A: teacher text 0.5; B: SOTU only),
# B started once A's sampling engine is up (vLLM's memory profiling must not see B allocate). Rerun = resume.
export PYTHONPATH=/root/vsite:${PYTHONPATH:-} D2DMOE_CACHE=/root/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
M=${M:-7}; T=${T:-570}
for w in ag an; do mkdir -p /root/$w && cp -n /root/recipe/gemma3-270m-q4_k_m.gguf /root/$w/; done
run() { timeout $T python3 benchmarks/gpu_convert_recipe.py --sparsify-activation anneal --methods d2dmoe,d2dmoe-per-layer \
        --no-sweep --minutes $M --work /root/$1 --out /root/out/$1 "${@:2}" >> $OUT/$1.log 2>&1; echo "$1 rc $?" >> $OUT/$1.log; }
cp /root/logs/*.log $OUT/ 2>/dev/null; mkdir -p /root/logs
run ag --generated 0.5 & A=$!
if [ "${WAIT:-1}" = 1 ]; then
  for i in $(seq 80); do grep -q "teacher-text\] ready" $OUT/ag.log && break; sleep 3; done
fi
grep -h "teacher-text\] ready" $OUT/ag.log; date
run an; wait $A
cp $OUT/*.log /root/logs/
cp -r /root/out/ag /root/out/an $OUT/ 2>/dev/null; ls -R $OUT | head -30
tail -5 $OUT/ag.log $OUT/an.log; nvidia-smi --query-gpu=memory.used --format=csv
