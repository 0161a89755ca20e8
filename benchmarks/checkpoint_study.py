"""What the CPU studies of one converted checkpoint share (``dropped_bias_study.py``, ``selection_rule_study.py``):
the checkpoint in the torch reference model with the converter's held-out tokens, and their plot's frame."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from d2dmoe_converter.calibrate import CalibrateOptions, heldout_sequences
from d2dmoe_converter.corpus import Corpus, load_corpus
from d2dmoe_converter.dense import load_dense, load_tokenizer
from d2dmoe_converter.evaluate import Checkpoint, build_moe, load_checkpoint
from d2dmoe_vllm.demo import default_model_gguf


@dataclass(frozen=True)
class Study:
    ckpt: Checkpoint
    model: torch.nn.Module      # the reference D2DMoE model, on the CPU, in eval mode
    tokenizer: object
    bos: int | None
    corpus: Corpus
    calib: torch.Tensor         # the converter's calibration sequences (they set tau)
    test: torch.Tensor          # the next held-out sequences: its report's tokens


def load_study(checkpoint: Path) -> Study:
    """``checkpoint`` (converted from the embedded Gemma 3 270M) in the reference model, with the held-out text
    laid out as the converter lays it out (``heldout_sequences``)."""
    dense = load_dense(default_model_gguf(Path.home() / ".cache" / "d2dmoe-vllm"))
    ckpt = load_checkpoint(checkpoint, dense)
    tok, corpus = load_tokenizer(dense), load_corpus()
    bos = dense.bos_token_id(tok)
    calib, test = heldout_sequences(tok, corpus.heldout, CalibrateOptions(), bos)
    return Study(ckpt, build_moe(ckpt, dense, torch.device("cpu")).eval(), tok, bos, corpus, calib, test)


def plot_perplexity_vs_compute(curves, ppl_all: float, title: str, path: Path) -> None:
    """Held-out perplexity (log) against executed FFN compute: ``curves`` is (label, [(fraction, ppl)], plot
    keywords) per line, with all experts' perplexity as a reference line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts, style in curves:
        ax.plot(*zip(*sorted(pts)), label=label, **style)
    ax.axhline(ppl_all, color="gray", ls="--", lw=1, label="all experts")
    ax.set_xlabel("executed FFN compute (held-out)")
    ax.set_ylabel("held-out SOTU perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
