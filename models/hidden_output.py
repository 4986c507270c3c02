"""Give an onnxgen folder its hidden states as an output (graph.add_hidden_output), in place, checked.

Export writes it since contrastive search came; the shipped model was exported before, and its training checkpoint
is not kept in the repository, so it got it with this instead of a new export (a folder exported before, quantized
or not, can take it so too):

    python models/hidden_output.py onnxgen/bundled/prose-mini

The edit renames a tensor and lists it as an output: the graph computes what it did. The check runs both graphs
over the evaluation text and requires the same logits, bit for bit, or nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxgen import graph
from onnxgen.folder import MODEL_FILE
from onnxgen.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edited import replace_graph  # noqa: E402

EVAL = Path(__file__).resolve().parents[1] / "onnxgen" / "data" / "eval.txt"


def logits(folder: Path, ids: list[int]) -> np.ndarray:
    """Every position's logits of one pass over `ids`, from an empty cache in place."""
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    feed: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], len(ids), i.shape[3]), np.float32)
    feed |= {"input_ids": np.array([ids], np.int64), "position_ids": np.arange(len(ids))[None],
             "seqlens_k": np.array([len(ids) - 1], np.int32), "total_sequence_length": np.array(len(ids), np.int32),
             "logits_to_keep": np.arange(len(ids), dtype=np.int64)}
    return session.run(["logits"], feed)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)  # the graph: weights in a data file stay there
    if not graph.add_hidden_output(model):
        raise SystemExit(f"{folder}: it has its hidden states already")
    ids = Tokenizer(folder / "tokenizer.json").encode(EVAL.read_text())[:256]

    def check(work: Path) -> str:
        if not np.array_equal(logits(folder, ids), logits(work, ids)):
            raise SystemExit(f"{folder}: the edited graph's logits differ; nothing written")
        return f"{len(ids)} positions' logits unchanged"

    print(f"{folder}: hidden states added ({replace_graph(folder, model, check)})")


if __name__ == "__main__":
    main()
