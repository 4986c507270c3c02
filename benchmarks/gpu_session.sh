#!/bin/bash
# The GPU checks as one device call (see the developers' guide): run from the project's root on a machine
# with an NVIDIA GPU, after ../shared/tools/gpu-carry.sh's part calls, with .gpu5 and .gpuenv carried:
#     bash benchmarks/gpu_session.sh
# Writes to $OUT (default benchmarks/results/gpu): the device, the `pytest -m cuda` log and benchmarks/gpu.py's
# tables for the gpt2-large shape (fp16 with the cache in place against PyTorch fp16, then fp32 with the growing
# cache, which issue 12 asks fp16 to beat on the same GPU: last, as its export takes the longest, and the tables
# are written after every case, so a run cut short keeps what it measured).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
source .gpuenv/gpu-setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
timeout 200 python3 -m pytest -m cuda -q -p no:cacheprovider --tb=line -rf tests/test_cuda.py 2>&1 | tail -40 > "$OUT/pytest-cuda.log"
tail -3 "$OUT/pytest-cuda.log"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu.py --tokenizer .gpuenv/gpt2-tokenizer --out "$OUT" --new-tokens 64 --runs 2 \
    --competitors onnxgen-fp16 pytorch-fp16 onnxgen-fp32 2>&1 | grep -v Warning | tail -30
