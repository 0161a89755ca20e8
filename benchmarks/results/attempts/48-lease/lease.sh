#!/bin/bash
# The next leases' measurements (planned in sessions 47-48), one device call each; STEP picks it, T caps it (seconds).
#   STEP=kernels   bare machine OK (stage payload chunk 0 in the same call): the full kernel table under the device's
#                  file (bench_kernels.py); ~45 s warm, ~80 s on a fresh machine (session 50).
#   STEP=teacher   after the payload's install (benchmarks/device/install_payload.sh), twice (it resumes): the
#                  teacher-text recipe (--generated 0.5) with the recipe's default 1000 adapt steps, a tau per layer;
#                  against session 47's 21.87 (no teacher text) and session 42's sparsified 21.12. ~16 min in all.
#   STEP=adapt2000 after install, twice (resumes): the recipe (ReLU, alpha 1e-3, no teacher text) with 2000 adapt steps
#                  in /root/ad2000; is 1000 steps the knee (240/600/1000: 22.79/22.25/21.87)? 14-17 min. Run it first:
#                  e16 and adaptlr start from its sparsified model.
#   STEP=stack     after install, twice (resumes): the three levers that each bought ~1% at 50% since session 47,
#                  together: alpha 3e-4 (21.78), 16-neuron experts (21.66), 2000 adapt steps (21.62), against 21.87.
#                  Prediction (session 56): ~21.0-21.2 if they add (+18-19%), not +5%. ~16-18 min, a lease of its own.
#   STEP=adapt1000 after install, once or twice: the recipe as it is (1000 adapt steps) from adapt2000's sparsified model,
#                  the same-machine baseline where adapt2000 ran on another device than session 47's H100. ~7 min.
#   STEP=kernelschoice bare machine OK: the full kernel table (as kernels) with the dispatch's choice path on at
#                  T >= 256 for every shape (FRACTION=0.4 unless given: gemm above that share of the pairs); only
#                  after condprobe passed. ~1.5 min. The JSON is kernels-<device>.json like kernels': rename it.
#   STEP=serve     after install, once or twice (--reuse resumes by engine): bench_serve.py's Gemma-2B-shape table
#                  (FRACTIONS=0.1,0.3,0.5 unless given) under this device's name, graphs up to 8192 tokens. ~8-10 min.
#   STEP=pinned    after install (SLIM payload): bench_serve.py --cpus ${CPUS:-auto} --rounds 2 at 30%, batch 1, 64, 256,
#                  128/128 (attempt 48's three-batch run, engines pinned); ~4.5 min.
#   STEP=floor     after install (SLIM payload): vLLM's host step alone -- profile_decode.py --small (d 256, 4 layers,
#                  vocab 8192: a step's GPU work is tens of us) at batch 1 and 256, async, pinned; the step time left is
#                  the engine's own. Attempt 48 reads batch 1 as host-bound at ~2.1-2.4 ms a step; ~2 min.
#   STEP=profile   after install (reuses STEP=serve's model in /root/serve where this machine has it, else writes
#                  one, ~25 s): decode at 30%, batch 1 and 256, dense against D2DMoE, async scheduling
#                  (profile_decode.py): wall per step against the GPU's busy time per step (the union of kernel
#                  intervals), the host ops of a decode step and every engine step's time (step_ms_each: is
#                  D2DMoE's steady decode step at batch 256 slower than dense's, or are a few steps slow? docs/kernels.md
#                  attempt 47). Session 58's profile (sums of kernel times, which
#                  PDL overlap inflates) could not say what D2DMoE's step waits on: ~0.8 ms a step at batch 1,
#                  ~2 ms more than dense's at batch 256 (docs/kernels.md attempt 46). ~4.5 min. Then, if time
#                  allows, P=1024 B=64 STEP=profile (~2.5 min): the prefill of 64 x 1024 tokens, 1.45x where the FFN
#                  alone is ~1.9x at 30% (gpu_busy_ms_prefill against ttft_ms: what the rest of the step costs).
#   STEP=condprobe bare machine OK (stage payload chunk 0 in the same call, as kernels): can the expert layer pick
#                  the gemm or the Triton path on the device, in a CUDA graph (IF nodes)? API, replay check, cost
#                  against the better path at 10/30/100% (attempts/56-lease/probe_conditional.py), then the GPU test of the
#                  dispatch's choice path (tests/test_kernels_gpu.py -k device_choice, 9 tests). ~3 min.
#   STEP=gputests  bare machine OK: the kernel GPU suite (tests/test_kernels_gpu.py; K="expr": those tests before all), the fp32 tests first (attempt 40's
#                  fix of the masked tiles; all passed in session 49), then the rest; T caps it (~2.5 min warm).
#   STEP=largekeys bare machine OK: the H200 file's large-T keys (gemm@ tiers, masked tiers; large-t-keys.json) against
#                  the H100 file at T=256-16384 (compare_configs.py), before any goes into the H100 file; ~4 min.
#   STEP=alpha3e-4 after install, twice (resumes): a lighter Hoyer weight (3e-4) with the default 1000 adapt steps.
#                  alpha 3e-3 cost +14% sparsified (session 44) and adapt closes most of the gap to the sparsified model
#                  (session 47), so a sparsified model nearer the original may now win at 50%. ~12 min.
#   STEP=e16       after install, once or twice: 16-neuron experts (128 per layer, co-activation split) with the default
#                  1000 adapt steps (-13% at 50% on the CPU model, docs/converter.md); starts from STEP=adapt2000's
#                  or STEP=sweep(moe)'s sparsified model when this machine has one (else sparsifies anew). ~7-9 min.
#   STEP=adaptlr   after install, once or twice: adapt at half its learning rate (LR=2.5e-5 unless given; gpu_convert_recipe.py
#                  --adapt-lr; the best rate on the CPU model was at or below 2.5e-5), 1000 steps; reuses a sparsified
#                  model the way e16 does. ~6-9 min. ADAPT=600: 600 steps (against session 47's 22.25 at 600 steps,
#                  default rate; ~2 min less), for a lease with ~14 min left.
#   STEP=sumref    after install, once or twice: the recipe with tau a fraction of the router scores' sum (--reference sum,
#                  session 61: -12% at 50% on the CPU main job's model, oracle -16%), 1000 adapt steps under that rule;
#                  reuses a sparsified model the way e16 does. Prediction: below 21.87 at 50% (the selection's ~8% of
#                  the gap shrinks), ~21.0-21.5. ~6-9 min; against the recipe's 21.87 (session 51) or a same-machine run.
#   STEP=sumcheck  bare machine OK: the sum reference's GPU tests (tests/test_kernels_gpu.py -k "sum_reference or
#                  no_host_synchronisation"), then the kernel table twice in one run of the machine: --reference max and
#                  --reference sum (bench_kernels.py; the same controlled pairs, so the ratio is the sum's cost). ~3 min.
#   STEP=sweep     after install, four calls (resumes): the quality JSON's GPU recipe with adapt (D2DMoE, a tau per layer, and
#                  MoEfication, 1000 adapt steps each, then the tau / k sweep: SOTU/Brown/BBC perplexity, BoolQ/PIQA/
#                  ARC-Easy); from adapt2000's sparsified model where this machine has it. ~30 min: session 51's three
#                  calls (1611 s) stopped 4 MoEfication points (~2.5 min) short, so it needs a lease of its own. Then here:
#                  python benchmarks/gpu_convert_recipe.py --merge FETCHED/sweep --out benchmarks/results/quality-gemma3-270m.json
#   STEP=sweepmoe  after install, two calls: what session 51's sweep did not reach, on a fresh machine: the same recipe with
#                  MoEfication alone (sparsify again, routers, adapt, its 4 points, the dense and original models). ~14 min
#                  (session 51's stage times, with the batched task scorer of session 52).
#                  Then here (--merge checks that both runs' dense model measured the same, i.e. one sparsified model,
#                  and that the sweep options are 767ae48's: a change to EvalOptions, TAUS or ITEMS before it is refused):
#                  python benchmarks/gpu_convert_recipe.py --merge benchmarks/results/attempts/51-lease/sweep FETCHED/sweep \
#                    --out benchmarks/results/quality-gemma3-270m.json
#   STEP=keep      after install, twice: GELU-tanh kept (--sparsify-activation keep; sparsified 20.51 against ReLU's 21.63,
#                  but 26.14 at 50% before adapt, session 43) with 1000 adapt steps. ~12 min.
# Session 48 ran kernels and teacher (docs/kernels.md attempt 39-40, docs/converter.md). Session 49 ran gputests,
# keep, alpha3e-4 and largekeys (results in attempts/49-lease/; attempt 41 put the large-T keys into the H100 file):
# Session 50 ran gputests and kernels under that file, then tune_kernels.py --paths gemm and kernels again
# (attempt 42, attempts/50-lease/; no recipe step: the first 20 minutes went to machines that did not start):
# Session 51 ran sweep (attempts/51-lease/: D2DMoE's 9 points; MoEfication's adapted checkpoint, no points).
# Session 52 (H100; the first 14 minutes went to machines that did not start) ran the gemm tuner with a 10% guard
# and the kernel table under its file and the committed one (attempt 43, refuted, reverted), the batched task
# scorer against the old one on the original model (attempts/52-lease/scorer_check.py: same picks on all 600
# items; PIQA + ARC-Easy 22.8 s -> 7.9 s per model) and the GPU suite under the guarded file.
# Session 53 ran no recipe step: its first try lost its machine (and 672 s) to an environment restart mid-install,
# then six calls found no machine (570 s); the H100 that came ran tests/test_moe_model_gpu.py, the reference
# layer's counters before / after 7ee16f3 (1.22-1.29x, same counts) and a CPU-default conversion + eval
# (attempts/53-lease/). A fresh machine needs all 10 payload chunks (make_payload.sh; ~4 s of device time each);
# the machine goes back after 30 s idle, so send the chunk calls together (one message ran them back to back).
# sweepmoe (--methods moefication alone) would have stopped before its sweep until session 53 (a missing routers stage
# record); the suite now runs the two-run flow and the e16 / adaptlr flow on a tiny model (tests/test_gpu_recipe_script.py).
# Session 54 (H100, attempts/54-lease/) ran sweepmoe (586 s with the install, then 257 s; merged: gpu_recipe is the
# sweep after adapt) and e16 (468 s: 21.66 at 49.9% against 64-neuron 21.87).
# Session 55 got no machine: 19 calls for an H100 or an H200 from 05:11 to 06:52 found none or were refused (1512 s of
# its 1800 s of device time went to starts that failed; the tool refuses a start under 240 s left).
# Session 56 (H100, attempts/56-lease/) ran adapt2000 (two calls: cut at adapt step 560, resumed; 21.62 at 50.0%
# against 1000 steps' 21.87, the prediction ~21.4) and adaptlr at 2.5e-5 (22.15: worse than 5e-5's 21.87).
# Session 57 (H100 after 4 failed starts, 720 s of its 1800 s; attempts/57-lease/) ran condprobe (the payload's torch
# 2.11 has no CUDA graph IF nodes: the choice cannot run under vLLM 0.26; kernelschoice is moot there), serve in one
# call (584 s with the install: the full table; four rows stalled on Triton compiles mid-run, fixed since, attempt 45)
# and gputests (fp32 192 passed; the rest cut at 39% by the call's limit, no failure before it).
# Session 58 (H100 after two failed starts, attempts/58-lease/) ran K="new_token_counts or grouped or cuda_graph"
# STEP=gputests (all passed; the rest of the suite in a second call from its 34%: passed), serve (584 s with the
# install: no compile in any row; batch 256 at 128/128 still 0.81-0.83x), profile_decode at batch 1 and 256 by hand
# (before busy time and decode host ops were recorded) and kernels (the table under unspecialized T; ratios unmoved).
# Session 59 had 138 s of device time at its start (less than a start): no lease. bench_serve and profile_decode
# time every engine step since (step_ms, steps; profile_decode's step_ms_each).
# Session 60 (H200 after four starts that found no machine; a SLIM=1 payload, 4 chunks, is all the synthetic steps
# need; attempts/60-lease/) ran STEP=profile and bench_serve at batch 256 and --rounds 2 at batch 1, 64, 256 by hand
# (docs/kernels.md attempt 48): batch 256 is host-bound, and an engine instance's host runs fast or ~1.5x slow at
# random, which alone set session 58's 0.82x (same-mode pairs: 0.98x, 1.09x). serve and profile now pass --cpus
# (CPUS=auto unless given: every engine pinned to one thread per core near the GPU).
# Sessions 61 and 62 got no machine (61: loans paused; 62: every start from 23:59 to 01:40 found none, and its 1800 s
# went to those starts). Next, first: STEP=sumcheck (bare machine, ~3 min: the sum reference's GPU tests, never run yet,
# and its kernel cost), then STEP=sumref (full payload, two calls: a fresh machine sparsifies first, ~11 min in all).
# Then: STEP=pinned (SLIM payload, ~4.5 min after install: is every batch-256 instance in one mode with --cpus auto,
# ratio 0.98-1.09x each round?) and STEP=floor (~2 min: vLLM's host step with a tiny model), then adaptlr LR=1e-4 (~11 min, full payload); stack in a lease of its own.
# Logs and results land in $OUT; rerun = resume while the machine is held.
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=/root/vsite:${PYTHONPATH:-} D2DMOE_CACHE=/root/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
T=${T:-560}
install() { python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1; }   # this tree as the package (the kernel steps; the payload installs it too)
convert() { mkdir -p /root/$1 $OUT/$1 && cp --update=none /root/recipe/gemma3-270m-q4_k_m.gguf /root/$1/ 2>/dev/null
            timeout $T python3 benchmarks/gpu_convert_recipe.py --work /root/$1 --out /root/res/$1 "${@:2}" >> $OUT/$1.log 2>&1
            echo "$1 rc $?" >> $OUT/$1.log; cp /root/res/$1/*.json $OUT/$1/ 2>/dev/null
            for f in /root/res/$1/*-sweep-*.png /root/res/$1/*-sparsify.png; do    # a call brings back 8 files at most:
              [ -f $f ] && [ $(ls $OUT/$1 | wc -l) -lt 6 ] && cp $f $OUT/$1/; done; }  # the JSONs first (session 51 lost two)
recipe() { convert $1 --methods d2dmoe-per-layer --no-sweep --minutes 30 "${@:2}"                  # one conversion, no sweep
           grep -h " rc \|perplexity  \|executed\|adapt   \|seconds per" $OUT/$1.log; }
sparsified() { for w in /root/ad2000 /root/sweep /root/sum; do [ $w != /root/$1 ] && test -f $w/stages/sparsify/stage.json \
                 && echo $w && return; done; }   # STEP=adapt2000's or STEP=sweep(moe)'s sparsified model (the recipe's
                 # sparsify options: ReLU, alpha 1e-3, no teacher text), where this machine has it; $1: the caller's work
STEPS="kernels, sumcheck, profile, pinned, floor, kernelschoice, teacher, adapt2000, stack, adapt1000, e16, adaptlr, sumref, serve, condprobe, sweep, sweepmoe, gputests, largekeys, alpha3e-4 or keep"
case "${STEP:?give STEP=$STEPS}" in
  kernels) install
           D2DMOE_GIT_SHA=${D2DMOE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} timeout $T \
             python3 benchmarks/bench_kernels.py --out "$OUT" > "$OUT/kernels.log" 2>&1; echo "kernels rc $?" >> "$OUT/kernels.log"
           tail -40 "$OUT/kernels.log" ;;
  teacher) recipe teacher --generated 0.5 ;;
  sumcheck) install
           timeout 150 python3 -m pytest -m gpu tests/test_kernels_gpu.py -k "sum_reference or no_host_synchronisation" \
             -q -rf -p no:cacheprovider > "$OUT/gpu-sum.log" 2>&1; echo "sum tests rc $?" >> "$OUT/gpu-sum.log"
           tail -4 "$OUT/gpu-sum.log"
           for R in max sum; do
             D2DMOE_GIT_SHA=${D2DMOE_GIT_SHA:-unknown} timeout 180 python3 benchmarks/bench_kernels.py --reference $R \
               --out "$OUT" > "$OUT/kernels-$R.log" 2>&1; echo "kernels $R rc $?" >> "$OUT/kernels-$R.log"; tail -1 "$OUT/kernels-$R.log"
           done ;;
  gputests) install
           S0=$(date +%s)
           if [ -n "${K:-}" ]; then   # K="...": these tests first (pytest -k), e.g. what changed since the last run
             timeout $T python3 -m pytest -m gpu tests/test_kernels_gpu.py -k "$K" -q -rf -p no:cacheprovider \
               > "$OUT/gpu-k.log" 2>&1; echo "k rc $?" >> "$OUT/gpu-k.log"; tail -3 "$OUT/gpu-k.log"; fi
           timeout $(( T - $(date +%s) + S0 )) python3 -m pytest -m gpu tests/test_kernels_gpu.py -k fp32 -q -rf \
             -p no:cacheprovider > "$OUT/gpu-fp32.log" 2>&1
           echo "fp32 rc $?" >> "$OUT/gpu-fp32.log"; tail -3 "$OUT/gpu-fp32.log"
           timeout $(( T - $(date +%s) + S0 )) python3 -m pytest -m gpu tests/test_kernels_gpu.py -k "not fp32" -q -rf \
             -p no:cacheprovider > "$OUT/gpu-rest.log" 2>&1; echo "rest rc $?" >> "$OUT/gpu-rest.log"; tail -3 "$OUT/gpu-rest.log" ;;
  largekeys) install
           (cd benchmarks && timeout $T python3 compare_configs.py --out "$OUT" --name 48-probe-h100-large-t-keys \
             --case gpt2-ffn:32,64,128 --case gemma3-270m-ffn:16,32,64 --case gemma-2b-ffn:128,256 \
             --tokens 64,256,1024,4096,16384 --fractions 0.3 \
             "--variant=H200-large-T-keys=$(cat results/attempts/48-lease/large-t-keys.json)" > "$OUT/largekeys.log" 2>&1)
           echo "largekeys rc $?" >> "$OUT/largekeys.log"; tail -60 "$OUT/largekeys.log" ;;
  alpha3e-4) recipe a3e4 --hoyer-alpha 3e-4 ;;
  keep)    recipe keep --sparsify-activation keep ;;
  e16)     W=$(sparsified e16); recipe e16 --expert-size 16 ${W:+--sparsified-from $W} ;;
  adaptlr) W=$(sparsified alr); recipe alr --adapt-lr ${LR:-2.5e-5} ${ADAPT:+--adapt-steps $ADAPT} ${W:+--sparsified-from $W} ;;
  sumref) W=$(sparsified sum); recipe sum --reference sum ${ADAPT:+--adapt-steps $ADAPT} ${W:+--sparsified-from $W} ;;
  condprobe) install   # attempts/56-lease/probe_conditional.py: the path chosen on the device (CUDA graph IF nodes)
           timeout $T python3 benchmarks/results/attempts/56-lease/probe_conditional.py --out "$OUT" > "$OUT/condprobe.log" 2>&1
           echo "condprobe rc $?" >> "$OUT/condprobe.log"; tail -40 "$OUT/condprobe.log"
           timeout 120 python3 -m pytest -m gpu tests/test_kernels_gpu.py -k device_choice -q -rf -p no:cacheprovider \
             > "$OUT/condtest.log" 2>&1; echo "condtest rc $?" >> "$OUT/condtest.log"; tail -15 "$OUT/condtest.log" ;;
  kernelschoice) install   # the kernel table with the choice path on for every shape at T >= 256 (the device file
           python3 - <<'PY'     # edited here, on the device's copy of the tree: the next call's copy is clean again)
import json, os, torch
from d2dmoe_kernels.configs import config_file
f = config_file(torch.cuda.get_device_name())
cfg = json.loads(f.read_text())
cfg["choice"] = {"min_tokens": 256, "max_tokens": 1 << 30, "fraction": float(os.environ.get("FRACTION", "0.4"))}
f.write_text(json.dumps(cfg, indent=1))
print("choice on in", f, cfg["choice"])
PY
           D2DMOE_GIT_SHA=${D2DMOE_GIT_SHA:-unknown}+choice timeout $T python3 benchmarks/bench_kernels.py --out "$OUT" \
             > "$OUT/kernels-choice.log" 2>&1; echo "kernelschoice rc $?" >> "$OUT/kernels-choice.log"
           tail -40 "$OUT/kernels-choice.log" ;;
  serve)   install   # the Gemma-2B-shape table of issue 5 under this device's name; --reuse: a rerun resumes engine by engine
           timeout $T python3 benchmarks/bench_serve.py --synthetic-gemma2b --fractions ${FRACTIONS:-0.1,0.3,0.5} \
             --batches 1,8,64,256 --shapes 128x128,1024x128 --repeats 2 --cpus ${CPUS:-auto} --work /root/serve --reuse --out "$OUT" \
             --capture-sizes 1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192 > "$OUT/serve.log" 2>&1
           echo "serve rc $?" >> "$OUT/serve.log"; tar czf "$OUT/serve-engine-logs.tgz" -C /root/serve $(cd /root/serve && ls *.log)
           grep -v "it/s" "$OUT/serve.log" | tail -45 ;;
  profile) install; W=/root/profile; [ -f /root/serve/model/taus.json ] && W=/root/serve   # serve's model, or one of its own
           mkdir -p $OUT/profile-p${P:-128}
           timeout $T python3 benchmarks/profile_decode.py --synthetic-gemma2b --fraction 0.3 --batches ${B:-1,256} \
             --prompt-len ${P:-128} --scheduling async --cpus ${CPUS:-auto} --work $W --out $OUT/profile-p${P:-128} \
             > $OUT/profile-p${P:-128}/profile.log 2>&1; echo "profile rc $?" >> $OUT/profile-p${P:-128}/profile.log
           grep -v "^   .*ms .*x  " $OUT/profile-p${P:-128}/profile.log | tail -30 ;;
  floor)   install; mkdir -p $OUT/floor
           timeout $T python3 benchmarks/profile_decode.py --small --batches 1,256 --scheduling async --cpus ${CPUS:-auto} \
             --work /root/floor --out $OUT/floor > $OUT/floor/profile.log 2>&1; echo "floor rc $?" >> $OUT/floor/profile.log
           grep -v "^   .*ms .*x  " $OUT/floor/profile.log | tail -12 ;;
  pinned)  install; mkdir -p $OUT/pinned
           timeout $T python3 benchmarks/bench_serve.py --synthetic-gemma2b --fractions 0.3 --batches 1,64,256 \
             --shapes 128x128 --repeats 3 --rounds 2 --cpus ${CPUS:-auto} --work /root/pinned --out $OUT/pinned \
             --capture-sizes 1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192 > $OUT/pinned/serve.log 2>&1
           echo "pinned rc $?" >> $OUT/pinned/serve.log; cp /root/pinned/*.log $OUT/pinned/ 2>/dev/null
           grep -v "it/s" $OUT/pinned/serve.log | tail -14 ;;
  adapt2000) recipe ad2000 --adapt-steps 2000 ;;
  stack)   recipe stack --hoyer-alpha 3e-4 --expert-size 16 --adapt-steps 2000 ;;
  adapt1000) W=$(sparsified a1000); recipe a1000 ${W:+--sparsified-from $W} ;;
  sweep|sweepmoe) W=$(sparsified sweep); M=d2dmoe-per-layer,moefication; [ $STEP = sweepmoe ] && M=moefication
           convert sweep --methods $M --minutes $(( (T - 40) / 60 )) ${W:+--sparsified-from $W}; tail -15 $OUT/sweep.log ;;
  *) echo "STEP=$STEP: give $STEPS" >&2; exit 2 ;;
esac
