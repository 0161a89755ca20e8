"""One forward per choice (the committed scorer for multi-token choices; for single-token choices it ran one
forward, this check two) vs the batched scorer, on the real Gemma 3 270M (fp32, CUDA when present): same picks?"""
import os, sys, time, torch, json
from pathlib import Path
from d2dmoe_vllm.demo import default_model_gguf
from d2dmoe_converter.dense import load_dense
from d2dmoe_converter.hf_model import build_model
from d2dmoe_converter.evaluate import EvalOptions, prepare_data, choice_logprobs, score_choices, LENGTH_NORMALISED
from d2dmoe_converter.dense import load_tokenizer
dense = load_dense(Path(os.environ.get("GGUF", "/root/recipe/gemma3-270m-q4_k_m.gguf")))
dev = "cuda" if torch.cuda.is_available() else "cpu"
model = build_model(dense).eval().to(dev)
tok = load_tokenizer(dense)
opts = EvalOptions(corpora=(), tasks=("piqa", "arc_easy", "boolq"), items=int(os.environ.get("ITEMS", 200)), device=dev)
data = prepare_data(dense, opts, tok)

@torch.no_grad()
def old(model, ctx, conts):
    out = []
    for c in conts:
        logits = model(input_ids=torch.tensor([ctx + c], device=dev), logits_to_keep=len(c) + 1).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1)
        out.append(lp.gather(-1, torch.tensor(c, device=dev)[:, None]).sum().item())
    return out

res = {}
for t, enc in data.tasks.items():
    r = {"same_pick": 0, "items": len(enc), "max_abs_diff": 0.0, "correct_old": 0, "correct_new": 0, "s_old": 0.0, "s_new": 0.0}
    for ctx, conts, label in enc:
        t0 = (torch.cuda.synchronize() if dev == "cuda" else None, time.time())[1]; a = old(model, ctx, conts); t1 = (torch.cuda.synchronize() if dev == "cuda" else None, time.time())[1]; b = choice_logprobs(model, ctx, conts); t2 = (torch.cuda.synchronize() if dev == "cuda" else None, time.time())[1]
        r["s_old"] += t1 - t0; r["s_new"] += t2 - t1
        texts = [tok.decode(c) for c in conts] if LENGTH_NORMALISED[t] else None
        pa, pb = score_choices(a, texts, LENGTH_NORMALISED[t]), score_choices(b, texts, LENGTH_NORMALISED[t])
        r["same_pick"] += pa == pb; r["correct_old"] += pa == label; r["correct_new"] += pb == label
        r["max_abs_diff"] = max(r["max_abs_diff"], max(abs(x - y) for x, y in zip(a, b)))
    res[t] = r; print(t, r, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
