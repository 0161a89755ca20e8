"""The reference expert layer's counters before (fc5d3e3: int() of the pair count and .cpu() of the per-token
counts, per layer per forward) and after 7ee16f3 (kept on the device until read), timed on the sweep's kind of
forward: 18 Gemma 3 270M FFN layers (d 640, 32 experts x 64, router width 128), fp32, random weights, counting
(padding rows excluded) and recording on. Same counts from both? How much time do the host syncs cost?
Usage: python reference_counters_check.py OUT.json"""
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
from provenance import provenance
from d2dmoe_converter.moe_model import ReferenceMoEMLP, counting
from d2dmoe_kernels.reference import dynamic_k_experts_reference, router_scores, select_experts


class Before(ReferenceMoEMLP):
    """fc5d3e3's forward, its counters plain Python ints (old_*)."""
    old_tokens = old_pairs = 0
    old_per_token: list = []

    def forward(self, x):
        t, flat = self.t, x.reshape(-1, x.shape[-1])
        mask = select_experts(router_scores(flat, t["router.in_proj.weight"], t["router.out_proj.weight"]), self.tau)
        seen = mask if self.counted is None else mask[self.counted]
        self.old_tokens += seen.shape[0]
        self.old_pairs += int(seen.sum())
        if self.record:
            self.old_per_token = self.old_per_token + [seen.sum(-1).cpu()]
        out = dynamic_k_experts_reference(flat, mask, t["experts.w_in"], t["experts.w_up"], t["experts.w_out"],
                                          t["experts.b_in"], t["b_out"], self.activation)
        return out.reshape(*x.shape[:-1], out.shape[-1])


dev, E, e, d, w, L = "cuda", 32, 64, 640, 128, 18
g = torch.Generator(device=dev).manual_seed(0)
rand = lambda *s: torch.randn(*s, generator=g, device=dev) / s[-1] ** 0.5
tensors = [{"router.in_proj.weight": rand(w, d), "router.out_proj.weight": rand(E, w), "experts.w_in": rand(E, e, d),
            "experts.w_up": rand(E, e, d), "experts.w_out": rand(E, e, d), "experts.b_in": None, "b_out": rand(d)}
           for _ in range(L)]
inputs = {T: (reps, torch.randn(T, d, generator=g, device=dev), torch.rand(T, generator=g, device=dev) > 0.1)
          for T, reps in ((2048, 20), (384, 100))}   # a perplexity batch (4 x 512); a task item's choices (4 x ~96)
rows = []
for cls in (Before, ReferenceMoEMLP):
    for T, (reps, x, keep) in inputs.items():
        layers = [cls(t, tau=0.15, top_k=0, activation="relu") for t in tensors]
        for m in layers:
            m.record = True
        def stack():
            for m in layers:
                with counting(m, keep):
                    m(x)
        for _ in range(3):
            stack()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(reps):
            stack()
        torch.cuda.synchronize(); ms = (time.perf_counter() - t0) / reps * 1e3
        if cls is Before:
            counts = [(m.old_tokens, m.old_pairs, int(torch.cat(m.old_per_token).sum())) for m in layers]
        else:
            counts = [(m.tokens, m.pairs, int(torch.cat(m.per_token).sum())) for m in layers]
        rows.append({"impl": cls.__name__, "tokens": T, "reps": reps, "ms_per_18_layers": round(ms, 4), "counts": counts})
        print(cls.__name__, T, f"{ms:.3f} ms per 18 layers", counts[0], flush=True)
for T in (2048, 384):
    b, a = [r for r in rows if r["tokens"] == T]
    print(f"T={T}: before {b['ms_per_18_layers']:.3f} ms, after {a['ms_per_18_layers']:.3f} ms "
          f"({b['ms_per_18_layers'] / a['ms_per_18_layers']:.2f}x); same counts: {b['counts'] == a['counts']}")
# what tests/test_moe_model_gpu.py checks: under sync-debug "error" the new forward runs, the old one raises
caught = {}
for cls in (Before, ReferenceMoEMLP):
    m, (_, x, keep) = cls(tensors[0], tau=0.15, top_k=0, activation="relu"), inputs[384]
    m.record = True
    torch.cuda.set_sync_debug_mode("error")
    try:
        with counting(m, keep):
            m(x)
        caught[cls.__name__] = "ran"
    except RuntimeError as err:
        caught[cls.__name__] = f"raised: {str(err).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
print("under set_sync_debug_mode('error'):", caught)
json.dump({**provenance(), "rows": rows, "sync_debug_error": caught}, open(sys.argv[1], "w"), indent=1)
