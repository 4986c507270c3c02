#!/usr/bin/env bash
# Installed size of onnxgen's runtime installs against the export stack and against what a user of optimum's
# ORTModelForCausalLM installs, with the largest packages of each runtime install. Fresh venvs in a temporary
# folder; writes benchmarks/results/install_sizes.json, which run.py folds into its report.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
size() {  # name, pip arguments...: MB of site-packages after the install (pip itself left out)
  local name="$1"; shift
  python3 -m venv "$tmp/$name"
  "$tmp/$name/bin/pip" install --quiet "$@" >/dev/null 2>&1
  local site=("$tmp/$name/lib/"python3*/site-packages)
  rm -rf "$site"/pip "$site"/pip-*.dist-info
  du -sm "$site" | cut -f1
}
largest() {  # name: the ten largest folders of its site-packages, as "name": MB pairs
  local site=("$tmp/$1/lib/"python3*/site-packages)
  du -sm "$site"/*/ | sort -rn | head -10 | awk '{n=$2; sub(".*/site-packages/", "", n); sub("/$", "", n); printf "%s\"%s\": %s", (NR>1?", ":""), n, $1}'
}
embed=$(size embed "$root" "onnxruntime>=1.31,<1.33")
runtime=$(size runtime "$root[cpu]")
full=$(size full "$root[cpu,export]")
optimum=$(size optimum "optimum[onnxruntime]" "torch==2.13.0")
mkdir -p "$root/benchmarks/results"
printf '{"onnxgen embedded in an app (onnxgen + onnxruntime, no CLI)": %s, "onnxgen runtime with its CLI (onnxgen[cpu])": %s, "onnxgen + export stack (onnxgen[cpu,export])": %s, "optimum[onnxruntime] + torch": %s, "largest packages": {"embedded": {%s}, "runtime with CLI": {%s}}}\n' \
  "$embed" "$runtime" "$full" "$optimum" "$(largest embed)" "$(largest runtime)" | tee "$root/benchmarks/results/install_sizes.json"
