#!/usr/bin/env bash
# The project's test command: sets up .venv with the test extras (scripts/setup.sh --dev), lints, runs the whole
# test suite, then runs the numerics-sensitive tests (marker `numerics`) a second time on other CPU kernel paths.
# Arguments go to the first pytest run; with arguments (a file, -k, -m ...) the second pass is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
if [ "$#" -gt 0 ]; then
    echo "scripts/test.sh: arguments given, the second pass on other CPU kernel paths is skipped"
    exit 0
fi
# CPUs differ in their kernels (AVX2 vs AVX-512, MKL vs oneDNN paths, thread counts), so results of matmuls agree
# only to a rounding bound. Rerun the tests that check such results with other kernel selections (no vector ISA
# in ATen, MKL and oneDNN limited to SSE4, one thread instead of several), so that an assertion that holds only
# on this machine's kernels fails here, before it ships.
echo "== numerics tests again: ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41, 1 thread"
ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    .venv/bin/python -m pytest -q -m numerics -p no:cacheprovider
