"""The dense model as a runnable Hugging Face torch model, for the training and measuring stages.

One home for "where are the layers / the FFN / its activation" across GPT-2 and Gemma, so the
stages never branch on the family themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from d2dmoe_converter.dense import DenseModel


def relu_config(config: dict) -> dict:
    """The dense config with the FFN activation (GPT-2) / gate activation (Gemma) set to ReLU."""
    config = dict(config)
    if config["model_type"] == "gpt2":
        config["activation_function"] = "relu"
    else:
        config["hidden_activation"] = config["hidden_act"] = "relu"
    return config


def empty_model(config: dict, attention: str = "eager") -> nn.Module:
    """A transformers causal LM of ``config``'s architecture in fp32, its weights as initialised
    (eager attention by default: works everywhere)."""
    import transformers as tf

    config = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map", "_name_or_path")}
    hf = tf.AutoConfig.for_model(**config)
    hf._attn_implementation = attention
    return tf.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)


def build_model(dense: DenseModel, *, relu: bool = False, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> nn.Module:
    """A transformers causal LM holding ``dense``'s weights (``empty_model``'s, then the weights)."""
    model = empty_model(relu_config(dense.config) if relu else dense.config)
    missing, unexpected = model.load_state_dict(dense.state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"dense weights do not fit the {dense.model_type} model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()  # from_config leaves training mode (dropout) on


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without the LM head (enough to measure what the FFNs do)."""
    return model.transformer if hasattr(model, "transformer") else model.model


def activation_attr(mlp: nn.Module) -> str:
    """Attribute name of the FFN activation module (GPT-2 ``act``, Gemma ``act_fn``)."""
    return "act" if hasattr(mlp, "c_fc") else "act_fn"


def state_dict_for_export(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with HF names, without the tied LM head."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", True):
        state.pop("lm_head.weight", None)
    return state
