#!/bin/bash
# The GPU checks as one device call (see the developers' guide): run from the project's root on a machine
# with an NVIDIA GPU, after ../shared/tools/gpu-carry.sh's part calls, with .gpu5 and .gpuenv carried:
#     OUT=$OUT bash benchmarks/gpu_session.sh
# Before the part calls, here: `bash benchmarks/gpu_prepare.sh` (gpu-carry.sh, plus llguidance and the tokenizer that
# the GPU image lacks); it prints the calls.
# In order, each step bounded by a timeout so that the call ends with what it measured: the `pytest -m cuda`
# log (while the gpt2-large folders are made on the CPU); benchmarks/gpu_variants.py's candidate changes to
# the fp16 step with CUDA graphs, after 32- and 512-token prompts (VARIANTS="..." to choose); benchmarks/gpu_kernels.py's
# list of the kernels of a batch-1 step after a 512-token prompt (fp16 and int4-fp16 as made, and fp16 with the
# fastest variant's environment where one beat it, and the CUDA-graph tests under it); then benchmarks/gpu.py's tables
# (COMPETITORS="..." to choose), as made and again with the fastest variant's environment.
# The device sends back at most 8 files: each step's JSON lands in $OUT as it finishes, and everything
# (Markdown, logs) in $OUT/gpu-results.tar at the end.
set -u
OUT=${OUT:-benchmarks/results/gpu}
RES=/tmp/gpu-results
mkdir -p "$OUT" "$RES"
source .gpuenv/gpu-setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RES/device.txt"
read -r -a COMPETITORS <<< "${COMPETITORS:-onnxgen-fp16+graph onnxgen-int4-fp16+graph pytorch-fp16}"
read -r -a VARIANTS <<< "${VARIANTS:-base gemm-tune gemm-tune-replay small-n-gemv}"
FP16=/tmp/onnxgen-gpu/onnx/fp16
(python3 benchmarks/gpu.py --tokenizer .gpuenv/gpt2-tokenizer --prepare --competitors "${COMPETITORS[@]}" onnxgen-fp16 \
    && python3 benchmarks/gpu_variants.py $FP16 --make --variants "${VARIANTS[@]}") > "$RES/prepare.log" 2>&1 &
prepare=$!
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -m cuda -q -p no:cacheprovider --tb=short -rf tests/test_cuda.py > "$OUT/pytest-cuda.log" 2>&1
tail -4 "$OUT/pytest-cuda.log"
wait $prepare || tail -20 "$RES/prepare.log"
timeout 150 python3 benchmarks/gpu_variants.py $FP16 --out "$RES" --variants "${VARIANTS[@]}" 2>&1 | grep -v Warning | tail -12
cp "$RES/variants.json" "$OUT/" 2>/dev/null
read -r -a BEST <<< "$(python3 benchmarks/gpu_variants.py $FP16 --best "$RES/variants.json" 2>/dev/null)"
echo "fastest variant's environment: ${BEST[*]:-none beat base}"
for folder in $FP16 $(ls -d ${FP16%/*}/int4-fp16 2>/dev/null); do
  timeout 60 python3 benchmarks/gpu_kernels.py $folder --prompt-tokens 512 --out "$RES/kernels-p512-${folder##*/}" 2>&1 | grep -v Warning | head -16
done
if [ ${#BEST[@]} -gt 0 ]; then
  timeout 60 env "${BEST[@]}" python3 benchmarks/gpu_kernels.py $FP16 --prompt-tokens 512 --out "$RES/kernels-p512-best" 2>&1 | grep -v Warning | head -16
  # A faster environment is worth a default only if it gives the CPU's tokens: the CUDA-graph parity tests under it.
  timeout 100 env "${BEST[@]}" python3 -m pytest -m cuda -q -p no:cacheprovider --tb=short -rf tests/test_cuda.py -k graph \
      > "$OUT/pytest-cuda-best.log" 2>&1
  tail -3 "$OUT/pytest-cuda-best.log"
fi
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/gpu.py --tokenizer .gpuenv/gpt2-tokenizer --out "$RES" --new-tokens 64 --runs 2 \
    --competitors "${COMPETITORS[@]}" 2>&1 | grep -v Warning | tail -14
cp "$RES/gpu.json" "$OUT/" 2>/dev/null
if [ ${#BEST[@]} -gt 0 ]; then
  timeout "${BENCH_TIMEOUT:-240}" env "${BEST[@]}" python3 benchmarks/gpu.py --tokenizer .gpuenv/gpt2-tokenizer --out "$RES/best" --new-tokens 64 \
      --runs 2 --competitors onnxgen-fp16+graph 2>&1 | grep -v Warning | tail -14
  cp "$RES/best/gpu.json" "$OUT/gpu-best.json" 2>/dev/null
fi
tar -cf "$OUT/gpu-results.tar" -C "$RES" .
