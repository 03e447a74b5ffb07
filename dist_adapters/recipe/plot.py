"""loss.png from metrics.jsonl (matplotlib, headless Agg backend)."""

from __future__ import annotations

import json
import os


def plot_loss(metrics_path: str, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            steps.append(row["step"])
            losses.append(row["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, marker=".", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(out_path))) or "loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
