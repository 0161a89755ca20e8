"""Torch reference of a whole D2DMoE model for the serving tests: the Hugging Face dense model with
each FFN replaced by the converter's reference expert layer (``d2dmoe_converter.moe_model``)."""

import json

import torch
import transformers as tf
from safetensors.torch import load_file

from d2dmoe_converter.moe_model import attach_experts, expert_layers, set_selection


def reference_model(dense_dir, ckpt_dir, tau, layer_tau=()):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    state = load_file(str(ckpt_dir / "model.safetensors"))
    model = tf.AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32, attn_implementation="eager")
    attach_experts(model, state, cfg["model_type"], cfg["d2dmoe"]["activation"], tau, cfg["d2dmoe"].get("top_k", 0),
                   reference=cfg["d2dmoe"].get("reference", "max"))
    if layer_tau:
        set_selection(model, tau, cfg["d2dmoe"].get("top_k", 0), layer_tau=layer_tau)
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
    mlps = expert_layers(model)
    for m in mlps:
        m.tokens = m.pairs = 0
    for seq in sequences:
        model(torch.tensor([seq]))
    return [(m.tokens, m.pairs) for m in mlps]
