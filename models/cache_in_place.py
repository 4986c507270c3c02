"""Give a growing-cache onnxgen folder the cache in place (graph.cache_in_place), in place, checked.

The shipped model was exported and quantized before export wrote GroupQueryAttention by default; its
training checkpoint is not kept in the repository, so it was converted with this instead of re-exported:

    python models/cache_in_place.py onnxgen/bundled/prose-mini

The converted graph computes the same function; in an int8 graph, though, each activation is quantized with
one scale per tensor, so float rounding differences of 1e-7 between the two attention kernels flip a few
int8 roundings on long inputs. The check is therefore the quantizer's own (accuracy.compare on the
evaluation text): perplexity within 0.5% and top-1 agreement at least 97%, or nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

from onnxgen import graph
from onnxgen.accuracy import compare
from onnxgen.folder import MODEL_FILE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edited import replace_graph  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    model = onnx.load(str(folder / MODEL_FILE))
    if not graph.cache_in_place(model):
        raise SystemExit(f"{folder}: no MultiHeadAttention layers to convert")

    def check(work: Path) -> str:
        report = compare(folder, work)
        ppl = report["perplexity_quantized"] / report["perplexity_fp32"] - 1
        summary = f"perplexity {report['perplexity_fp32']:.3f} -> {report['perplexity_quantized']:.3f} ({ppl:+.2%}), top-1 agreement {report['top1_agreement']:.2%}"
        if ppl > 0.005 or report["top1_agreement"] < 0.97:
            raise SystemExit(f"{folder}: the converted graph differs: {summary}; nothing written")
        return summary

    print(f"{folder}: cache in place; {replace_graph(folder, model, check, {'cache_in_place': True})}")


if __name__ == "__main__":
    main()
