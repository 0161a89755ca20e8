"""D2DMoE GPT-2 for vLLM: vLLM's GPT-2 skeleton with the MLP replaced by ``DynamicKMLP``."""


from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.gpt2 import GPT2Attention
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


class D2DMoEGPT2Block(nn.Module):
    def __init__(self, config, moe, cache_config, quant_config, prefix: str):
        super().__init__()
        d = config.hidden_size
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, cache_config, quant_config, prefix=f"{prefix}.attn")
        if moe.projections:
            attach_projection_experts(self.attn, moe, extract_layer_index(prefix), "gpt2", f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp = DynamicKMLP(moe, extract_layer_index(prefix), d, prefix=f"{prefix}.mlp")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


@support_torch_compile
class D2DMoEGPT2Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        moe = engine_config(vllm_config.model_config.model, config)
        log_serving_advice(vllm_config)
        self.config = config
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.wte")
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.start_layer, self.end_layer, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: D2DMoEGPT2Block(
                config, moe, vllm_config.cache_config, vllm_config.quant_config, prefix=prefix
            ),
            prefix=f"{prefix}.h",
        )
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden_states = inputs_embeds + self.wpe(position_ids)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in islice(self.h, self.start_layer, self.end_layer):
            hidden_states = layer(hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.ln_f(hidden_states)


def _conv1d_to_linear(weights: Iterable[tuple[str, torch.Tensor]]):
    # HF GPT-2 stores its attention Linear weights transposed (Conv1D); expert tensors are ours.
    for name, tensor in weights:
        if name.endswith((".attn.c_attn.weight", ".attn.c_proj.weight")):
            tensor = tensor.t()
        yield name, tensor


class D2DMoEGPT2LMHeadModel(nn.Module, SupportsPP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.transformer = D2DMoEGPT2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors
        start_reporting(self)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(
            self,
            _conv1d_to_linear(weights),
            skip_prefixes=("lm_head.",) if self.config.tie_word_embeddings else (),
            skip_substrs=(".attn.bias", ".attn.masked_bias"),
        )
