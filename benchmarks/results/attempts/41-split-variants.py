import sys, torch
sys.path.insert(0, "/work/main/benchmarks")
import split_study as S
from pathlib import Path
from d2dmoe_converter.kmeans import balanced_kmeans_order
from d2dmoe_converter.corpus import load_corpus, token_sequences
from d2dmoe_converter.dense import load_dense, load_tokenizer
from d2dmoe_converter.hf_model import build_model, decoder_layers
from d2dmoe_vllm.demo import default_model_gguf
torch.set_num_threads(1)
dense = load_dense(default_model_gguf(Path.home()/".cache"/"d2dmoe-vllm"))
tok = load_tokenizer(dense); corpus = load_corpus(); bos = dense.bos_token_id(tok)
fit = token_sequences(tok, corpus.train, 16, 256, bos=bos, shuffle_seed=0, what="fit")
test = token_sequences(tok, corpus.heldout, 8, 256, bos=bos, what="test")
for relu in (False, True):
    model = build_model(dense, relu=relu).eval()
    xf, xt = S.ffn_inputs(model, fit), S.ffn_inputs(model, test)
    res = {}
    for i, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        with torch.no_grad():
            hf, ht = S.hidden(mlp, xf[i]), S.hidden(mlp, xt[i])
            a = hf.abs()
            feats = {"abs": a, "rownorm": a / a.norm(dim=1, keepdim=True).clamp_min(1e-9),
                     "nobos": a[torch.arange(a.shape[0]) % 256 != 0],
                     "binary": (a > a.quantile(0.9, dim=0, keepdim=True)).float()}
            for k, f in feats.items():
                o = balanced_kmeans_order(f.t(), 32, seed=i)
                y, n = S.expert_norms_and_outputs(ht, mlp.down_proj.weight.float(), o, 32)
                res.setdefault(k, []).append(S.kept_error(y, S.tau_keep(n, 0.5)))
        print(relu, i, {k: round(v[-1], 4) for k, v in res.items()}, flush=True)
    print("MEAN relu" if relu else "MEAN gelu", {k: round(sum(v)/len(v), 4) for k, v in res.items()}, flush=True)
