"""Torch reference of a whole D2DMoE model: the Hugging Face dense model with each FFN replaced by
router + selection + masked all-experts compute (``d2dmoe_kernels.reference``), counting its own
executed token-expert pairs."""

import json

import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

from d2dmoe_kernels import dynamic_k_experts_reference, router_scores, select_experts
from d2dmoe_vllm.checkpoint import layer_prefix


class ReferenceMoEMLP(nn.Module):
    def __init__(self, state, prefix, tau, activation):
        super().__init__()
        self.t = {k: state.get(prefix + k) for k in ("router.in_proj.weight", "router.out_proj.weight", "experts.w_in",
                                                     "experts.w_up", "experts.w_out", "experts.b_in", "b_out")}
        self.tau, self.activation = tau, activation
        self.tokens = self.pairs = 0

    def forward(self, x, *args, **kwargs):
        t = self.t
        flat = x.reshape(-1, x.shape[-1])
        scores = router_scores(flat, t["router.in_proj.weight"], t["router.out_proj.weight"])
        mask = select_experts(scores, self.tau)
        self.tokens += flat.shape[0]
        self.pairs += int(mask.sum())
        out = dynamic_k_experts_reference(flat, mask, t["experts.w_in"], t["experts.w_up"], t["experts.w_out"],
                                          t["experts.b_in"], t["b_out"], self.activation)
        return out.reshape(x.shape)


def reference_model(dense_dir, ckpt_dir, tau):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    state = load_file(str(ckpt_dir / "model.safetensors"))
    model = tf.AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32, attn_implementation="eager")
    layers = model.transformer.h if cfg["model_type"] == "gpt2" else model.model.layers
    for i, layer in enumerate(layers):
        layer.mlp = ReferenceMoEMLP(state, layer_prefix(cfg["model_type"], i) + "mlp.", tau, cfg["d2dmoe"]["activation"])
    return model.eval()


@torch.no_grad()
def greedy(model, prompt_ids, steps):
    """Greedy tokens and their logprobs, recomputing the whole sequence each step (no cache)."""
    ids, tokens, logprobs = list(prompt_ids), [], []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        ids.append(tok)
    return tokens, logprobs


@torch.no_grad()
def count_pairs(model, sequences):
    """Executed (tokens, pairs) when each sequence's tokens pass through the model once."""
    mlps = [m for m in model.modules() if isinstance(m, ReferenceMoEMLP)]
    for m in mlps:
        m.tokens = m.pairs = 0
    for seq in sequences:
        model(torch.tensor([seq]))
    return [(m.tokens, m.pairs) for m in mlps]
