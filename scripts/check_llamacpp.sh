#!/usr/bin/env bash
# The llama.cpp check: llama.cpp itself (llama-cpp-python) loads the embedded base model's GGUF with the GGUF adapters
# `rlora export --format gguf` writes, generates greedily, and is compared with `rlora generate --adapter` on the
# fixed-gate model; the same with two heads of an `--as-scales` export mixed per request by scales
# (tests/test_export_deploy.py, marker `llamacpp`). Not in scripts/test.sh: llama-cpp-python compiles llama.cpp from
# source, 10-60 minutes on 2 cores, once. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if ! "$python" -c "import llama_cpp" 2>/dev/null; then
    echo "== installing llama-cpp-python (compiles llama.cpp once; set CMAKE_BUILD_PARALLEL_LEVEL for more cores)"
    # the version of pyproject.toml's llamacpp extra
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$python" -m pip install "llama-cpp-python==0.3.36"
fi
"$python" -m pytest -q -s -m llamacpp tests/test_export_deploy.py "$@"
