#!/usr/bin/env bash
# Installed size of a runtime-only onnxgen environment against the export stack and against what a
# user of optimum's ORTModelForCausalLM installs. Fresh venvs in a temporary folder; writes
# benchmarks/results/install_sizes.json, which run.py folds into its report.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
size() {  # name, pip arguments...: MB of site-packages after the install
  local name="$1"; shift
  python3 -m venv "$tmp/$name"
  "$tmp/$name/bin/pip" install --quiet "$@" >/dev/null 2>&1
  du -sm "$tmp/$name/lib/"python3*/site-packages | cut -f1
}
runtime=$(size runtime "$root[cpu]")
full=$(size full "$root[cpu,export]")
optimum=$(size optimum "optimum[onnxruntime]" "torch==2.13.0")
mkdir -p "$root/benchmarks/results"
printf '{"onnxgen runtime (onnxgen[cpu])": %s, "onnxgen + export stack (onnxgen[cpu,export])": %s, "optimum[onnxruntime] + torch": %s}\n' \
  "$runtime" "$full" "$optimum" | tee "$root/benchmarks/results/install_sizes.json"
