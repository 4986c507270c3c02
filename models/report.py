"""The recipe's results: loss curve (PNG) from a training run, and samples of every decoding strategy
from an onnxgen folder, as Markdown for models/README.md.

    python models/report.py --run models/runs/prose-mini --model onnxgen/bundled/prose-mini
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnxgen

PROMPTS = ["It is a truth universally acknowledged", "Call me Ishmael.", "The state of the Union is"]
STRATEGIES = {
    "greedy": {"do_sample": False, "repetition_penalty": 1.0},
    "beam (4 beams, no-repeat 3-gram)": {"do_sample": False, "num_beams": 4, "no_repeat_ngram_size": 3, "repetition_penalty": 1.0},
    "top-k 40, temperature 0.8": {"do_sample": True, "top_k": 40, "top_p": 1.0, "temperature": 0.8, "seed": 0},
    "defaults (top-p 0.9, temperature 0.8, repetition penalty 1.2)": {"seed": 0},
}


def loss_curve(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [e["step"] for e in log]
    ax.plot(steps, [e["train_loss"] for e in log], label="train loss (batch)")
    ax.plot(steps, [e["val_loss"] for e in log], label="validation loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [e["val_bpb"] for e in log], color="#888888", linestyle="--", label="validation bits/byte")
    ax.set_xlabel("step (16 x 256 tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax2.set_ylabel("bits per byte")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="training run folder (training.json)")
    ap.add_argument("--model", type=Path, required=True, help="onnxgen folder to sample from")
    ap.add_argument("--png", type=Path, default=Path(__file__).parent / "loss.png")
    args = ap.parse_args()
    training = json.loads((args.run / "training.json").read_text())
    loss_curve(training["log"], args.png)
    model = onnxgen.load(args.model)
    print(f"Final: {json.dumps(training['final'])}\n")
    for name, options in STRATEGIES.items():
        print(f"**{name}**\n")
        for prompt in PROMPTS:
            text = model.generate(prompt, max_new_tokens=40, **options)[0].text
            print(f"> *{prompt}*{text}\n".replace("\n\n", " ").strip() + "\n")


if __name__ == "__main__":
    main()
