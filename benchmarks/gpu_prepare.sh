#!/bin/bash
# Here, before a GPU session's device calls (see gpu_session.sh): everything the device needs besides the checkout,
# in ignored folders that the calls carry. ../shared/tools/gpu-carry.sh packs onnxruntime-gpu into .gpu1 .. .gpuN and
# the export stack's wheels into .gpuenv; the GPU image also lacks llguidance (the constrained-decoding tests) and a
# GPT-2 tokenizer (benchmarks/gpu.py's), which go into .gpuenv too (gpu-setup.sh installs every wheel in .gpuenv/whl).
# It prints the device calls to make, back to back.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/tools/gpu-carry.sh | grep -v "^  carry"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 -d .gpuenv/whl "llguidance==1.9.1"
cp -r ../shared/data/gpt2-tokenizer .gpuenv/
last=$(ls -d .gpu[0-9]* | sort -V | tail -1)
echo "device calls, back to back (ask for nvidia-h200 in the first):"
for d in $(ls -d .gpu[0-9]* | sort -V); do
    [ "$d" = "$last" ] || echo "  run(carry=[\"$d\"], command=\"mkdir -p /tmp/chunks && cp $d/part-* /tmp/chunks/\")"
done
echo "  run(carry=[\"$last\", \".gpuenv\"], command=\"COMPETITORS='onnxgen-fp16+graph onnxgen-int4-fp16+graph' OUT=\$OUT bash benchmarks/gpu_session.sh\", timeout_s=540)"
echo "then give_back; the tree ($(git ls-files -z | du -ch --files0-from=- | tail -1 | cut -f1)) + $last + .gpuenv ($(du -sh .gpuenv | cut -f1)) must stay under 64 MiB"
