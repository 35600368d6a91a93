#!/usr/bin/env bash
# On a lent GPU machine (bare image with torch, no vLLM): the missing wheels from .whl/
# (docs/BENCHMARKS.md, "GPU checks", says which), then bench/gpu_check.py and the suite's
# tests that need no vLLM, on CUDA. Report and logs go to $OUT.
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TEACHER_CACHE_HOME=/tmp/tch PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
timeout "${CHECK_S:-150}" python3 bench/gpu_check.py --out "$OUT/gpu_check.json" >"$OUT/gpu_check.log" 2>&1
echo "gpu_check rc $?"
tail -c 5000 "$OUT/gpu_check.log"
timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 200 tests/student_train \
    tests/teacher_cache/test_attention.py tests/teacher_cache/test_backends.py -k "not vllm" >"$OUT/pytest.log" 2>&1
echo "pytest rc $?"
tail -c 6000 "$OUT/pytest.log"
