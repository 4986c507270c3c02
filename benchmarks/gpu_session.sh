#!/bin/bash
# The GPU checks as one device call (see the developers' guide): run from the project's root on a machine
# with an NVIDIA GPU, after ../shared/tools/gpu-carry.sh's part calls, with .gpu5 and .gpuenv carried:
#     bash benchmarks/gpu_session.sh
# Writes to $OUT (default benchmarks/results/gpu): the device, the `pytest -m cuda` log, benchmarks/gpu.py's
# tables for the gpt2-large shape: fp16 with the cache in place, with and without CUDA graphs, PyTorch fp16, and
# fp32 with the growing cache (which issue 12 asks fp16 to beat on the same GPU; COMPETITORS="..." for fewer),
# benchmarks/overhead.py's split of a batch-1 step with CUDA graphs and benchmarks/gpu_kernels.py's list of
# the kernels in it. The folders are made on the CPU while the tests run; the tables are written after every
# case, so a run cut short keeps what it measured.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
source .gpuenv/gpu-setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
read -r -a COMPETITORS <<< "${COMPETITORS:-onnxgen-fp16+graph onnxgen-fp16 pytorch-fp16 onnxgen-fp32}"
python3 benchmarks/gpu.py --tokenizer .gpuenv/gpt2-tokenizer --prepare --competitors "${COMPETITORS[@]}" > "$OUT/prepare.log" 2>&1 &
prepare=$!
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -m cuda -q -p no:cacheprovider --tb=short -rf tests/test_cuda.py > "$OUT/pytest-cuda.log" 2>&1
tail -4 "$OUT/pytest-cuda.log"
wait $prepare || tail -20 "$OUT/prepare.log"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu.py --tokenizer .gpuenv/gpt2-tokenizer --out "$OUT" --new-tokens 64 --runs 2 \
    --competitors "${COMPETITORS[@]}" 2>&1 | grep -v Warning | tail -30
# Where a batch-1 step's time goes with CUDA graphs: the replay against onnxgen's own work around it.
timeout 60 python3 benchmarks/overhead.py /tmp/onnxgen-gpu/onnx/fp16 --provider cuda --cuda-graph --runs 3 --out "$OUT" 2>&1 | tail -6
# And which kernels that GPU time is (the way to 600 tok/s at batch 1).
timeout 90 python3 benchmarks/gpu_kernels.py /tmp/onnxgen-gpu/onnx/fp16 --out "$OUT" 2>&1 | grep -v Warning | tail -40
