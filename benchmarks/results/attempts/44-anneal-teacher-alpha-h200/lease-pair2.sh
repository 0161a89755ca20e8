# session 44's lease, second pair (ReLU): A = teacher text 1.0 (/root/g1), B = Hoyer weight 3e-3 (/root/a3), B started
# once A's sampling engine is up. Rerun with WAIT=0 = resume.
export PYTHONPATH=/root/vsite:${PYTHONPATH:-} D2DMOE_CACHE=/root/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
M=${M:-6.5}; T=${T:-540}
for w in g1 a3; do mkdir -p /root/$w && cp --update=none /root/recipe/gemma3-270m-q4_k_m.gguf /root/$w/; done
run() { timeout $2 python3 benchmarks/gpu_convert_recipe.py --methods d2dmoe,d2dmoe-per-layer \
        --no-sweep --minutes $M --work /root/$1 --out /root/out/$1 "${@:3}" >> $OUT/$1.log 2>&1; echo "$1 rc $?" >> $OUT/$1.log; }
cp /root/logs/*.log $OUT/ 2>/dev/null; mkdir -p /root/logs; rm -f $OUT/ag.log $OUT/an.log
S=$(date +%s)
run g1 $T --generated 1.0 & A=$!
if [ "${WAIT:-1}" = 1 ]; then
  for i in $(seq 80); do grep -q "teacher-text\] ready" $OUT/g1.log && break; sleep 3; done
fi
run a3 $(( T - $(date +%s) + S )) --hoyer-alpha 3e-3; wait $A
cp $OUT/*.log /root/logs/
cp -r /root/out/g1 /root/out/a3 $OUT/ 2>/dev/null; grep -h "rc \|teacher-text\] {" $OUT/*.log
