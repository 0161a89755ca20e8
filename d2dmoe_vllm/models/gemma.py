"""D2DMoE Gemma, Gemma 2 and Gemma 3 (text) for vLLM.

One skeleton for the family: vLLM's attention class of each generation, its norms, and the MLP
replaced by ``DynamicKMLP``. Gemma 2/3 wrap attention and FFN in extra ("sandwich") norms and may
soft-cap the final logits; that is all that differs here.
"""


import re
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from d2dmoe_vllm.advice import log_serving_advice
from d2dmoe_vllm.checkpoint import engine_config
from d2dmoe_vllm.expert_layer import DynamicKMLP, attach_projection_experts
from d2dmoe_vllm.models.loading import load_named_weights
from d2dmoe_vllm.stats import start_reporting


def _make_attention(config, cache_config, quant_config, prefix: str) -> nn.Module:
    """vLLM's own attention module for this Gemma generation (q/k/v/o, rotary, paged attention)."""
    common = dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        cache_config=cache_config,
        quant_config=quant_config,
        prefix=prefix,
    )
    if config.model_type == "gemma":
        from vllm.model_executor.models.gemma import GemmaAttention

        return GemmaAttention(rope_parameters=config.rope_parameters, **common)
    if config.model_type == "gemma2":
        from vllm.model_executor.models.gemma2 import Gemma2Attention

        return Gemma2Attention(config=config, attn_logits_soft_cap=config.attn_logit_softcapping, **common)
    from vllm.model_executor.models.gemma3 import Gemma3Attention

    return Gemma3Attention(config=config, attn_logits_soft_cap=None, **common)


class D2DMoEGemmaDecoderLayer(nn.Module):
    def __init__(self, config, moe, cache_config, quant_config, prefix: str):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.sandwich = config.model_type != "gemma"
        self.self_attn = _make_attention(config, cache_config, quant_config, f"{prefix}.self_attn")
        if moe.projections:
            attach_projection_experts(self.self_attn, moe, extract_layer_index(prefix), config.model_type,
                                      f"{prefix}.self_attn")
        self.mlp = DynamicKMLP(moe, extract_layer_index(prefix), d, prefix=f"{prefix}.mlp")
        self.input_layernorm = GemmaRMSNorm(d, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps=eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps=eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(d, eps=eps)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if self.sandwich:
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
            hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        else:
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


@support_torch_compile
class D2DMoEGemmaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        moe = engine_config(vllm_config.model_config.model, config)
        log_serving_advice(vllm_config)
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: D2DMoEGemmaDecoderLayer(
                config, moe, vllm_config.cache_config, vllm_config.quant_config, prefix=prefix
            ),
            prefix=f"{prefix}.layers",
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Gemma scales embeddings by sqrt(d), rounded to the model's dtype as in HF.
        self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.normalizer

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class D2DMoEGemmaForCausalLM(nn.Module, SupportsPP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = D2DMoEGemmaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(
            config.vocab_size, soft_cap=getattr(config, "final_logit_softcapping", None)
        )
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        start_reporting(self)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(
            self,
            _qkv_expert_names(weights),
            stacked=(("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v")),
            skip_prefixes=("lm_head.",) if self.config.tie_word_embeddings else (),
        )


_QKV_EXPERT = re.compile(r"\.self_attn\.(?=[qkv]_proj\.(router|experts|b_out))")


def _qkv_expert_names(weights: Iterable[tuple[str, torch.Tensor]]):
    # q/k/v expert layers live under the fused ``qkv_proj`` module (ExpertQKV); dense q/k/v stay stacked.
    for name, tensor in weights:
        yield _QKV_EXPERT.sub(".self_attn.qkv_proj.", name, count=1), tensor


class D2DMoEGemma2ForCausalLM(D2DMoEGemmaForCausalLM):
    pass


class D2DMoEGemma3ForCausalLM(D2DMoEGemmaForCausalLM):
    pass
