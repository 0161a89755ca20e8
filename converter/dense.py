"""Reading a dense checkpoint: a Hugging Face safetensors directory or a GGUF file.

Gives the config as a dict and the state dict with the base model's HF names. Pickle weights are
never read.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from d2dmoe_vllm.config import CheckpointError

SUPPORTED_MODEL_TYPES = ("gpt2", "gemma", "gemma2", "gemma3_text")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass
class DenseModel:
    config: dict
    state: dict[str, torch.Tensor]
    source: Path | None               # directory holding the tokenizer files, or
    tokenizer: object = None          # a loaded tokenizer (GGUF input) to save_pretrained()

    def save_tokenizer(self, dest: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(dest))
        else:
            for name in TOKENIZER_FILES:
                if (self.source / name).is_file():
                    shutil.copy2(self.source / name, dest / name)
        cfg_file = dest / "tokenizer_config.json"
        if self.model_type != "gpt2" and cfg_file.is_file():
            # Gemma is trained with BOS first; say so explicitly (a GGUF's tokenizer, saved, loses the
            # flag, and some transformers versions then encode without BOS).
            cfg = json.loads(cfg_file.read_text())
            if cfg.get("add_bos_token") is not True:
                cfg["add_bos_token"] = True
                cfg_file.write_text(json.dumps(cfg, indent=2))

    def bos_token_id(self, tokenizer) -> int | None:
        """BOS to start every training/evaluation sequence with: Gemma's; GPT-2 uses none."""
        return None if self.model_type == "gpt2" else tokenizer.bos_token_id

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def num_layers(self) -> int:
        return self.config.get("num_hidden_layers", self.config.get("n_layer"))

    @property
    def hidden_size(self) -> int:
        return self.config.get("hidden_size") or self.config["n_embd"]

    @property
    def d_ff(self) -> int:
        if self.model_type == "gpt2":
            return self.config.get("n_inner") or 4 * self.hidden_size
        return self.config["intermediate_size"]


def _error(path, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"dense checkpoint {path}: {problem}. Fix: {fix}")


def check_model_type(config: dict, path) -> None:
    model_type = config.get("model_type")
    if model_type == "gemma3":
        raise _error(path, "is a multimodal Gemma 3 (model_type 'gemma3')",
                     "convert its text model: a checkpoint with model_type 'gemma3_text'")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _error(path, f"model_type {model_type!r} is not supported", f"use one of {list(SUPPORTED_MODEL_TYPES)}")


def load_dense(path: str | Path) -> DenseModel:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if not path.is_dir():
        raise _error(path, "is neither a directory nor a .gguf file", "pass a Hugging Face model directory or a GGUF file")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise _error(path, "has no config.json", "pass a Hugging Face model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise _error(cfg_file, f"is not valid JSON ({err})", "restore the file") from err
    check_model_type(config, path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise _error(path, "has no *.safetensors weights (pickle .bin files are never loaded)",
                     "save the model with save_pretrained(..., safe_serialization=True)")
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:
            raise _error(f, f"unreadable safetensors file ({err})", "re-download or re-save the model") from err
    if config["model_type"] == "gpt2":
        # Some GPT-2 checkpoints omit the "transformer." prefix.
        state = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in state.items()}
    return DenseModel(config, _untie(state, config), path)


def _load_gguf(path: Path) -> DenseModel:
    """GGUF through transformers' dequantising loader; the weights come back as plain tensors."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise _error(path, f"reading GGUF needs the {module!r} package", "pip install 'd2dmoe-vllm[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as err:
        raise _error(path, f"transformers could not read it ({err})", "pass a GGUF of a GPT-2 or Gemma model") from err
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    check_model_type(config, path)
    # Gemma is trained with a BOS token at the start of every sequence; GGUF metadata loses that flag.
    bos = {"add_bos_token": True} if config["model_type"] != "gpt2" else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **bos)
    check_bpe_merges(tokenizer, path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return DenseModel(config, _untie(state, config), None, tokenizer)


PROBE_TEXT = ("The State of the Union is strong, and the people of the United States are working together "
              "for a better future.")


def check_bpe_merges(tokenizer, path) -> None:
    """Refuse a tokenizer read without its BPE merges. Some transformers releases (5.17 seen) read a
    Gemma 3 GGUF's tokenizer so that common words split into pieces although the whole word is one
    vocabulary entry (' State' -> ' St', 'ate'); training and perplexity on such tokens are garbage
    (Gemma 3 270M held-out perplexity 192 instead of 18.8)."""
    import transformers

    tokens = tokenizer.convert_ids_to_tokens(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    vocab = tokenizer.get_vocab()
    mergeable = sum(a + b in vocab for a, b in zip(tokens, tokens[1:]))
    if mergeable > len(tokens) // 4:
        raise _error(path, f"transformers {transformers.__version__} read its tokenizer without the BPE merges "
                           f"({mergeable} of {len(tokens) - 1} neighbouring tokens of a plain English sentence are one "
                           f"vocabulary entry together: {tokens[:6]}...)",
                     "pip install 'transformers>=5.19' (checked: 5.19 reads it right, 5.17 does not)")


def _untie(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Drop the LM head when it is the embedding matrix (tied), as save_pretrained does."""
    if config.get("tie_word_embeddings", True):
        state.pop("lm_head.weight", None)
    return state


def load_tokenizer(dense: DenseModel):
    """The dense model's tokenizer (the one read from the GGUF, or the directory's files)."""
    if dense.tokenizer is not None:
        return dense.tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(dense.source))
    except Exception as err:
        raise _error(dense.source, f"its tokenizer cannot be loaded ({err})",
                     "put the tokenizer files (tokenizer.json, or vocab.json + merges.txt) beside config.json") from err
