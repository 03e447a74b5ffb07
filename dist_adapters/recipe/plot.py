"""loss.png from metrics.jsonl (matplotlib, headless Agg backend): the training loss, and the
evaluation loss where rows carry one."""

from __future__ import annotations

import json
import os


def plot_loss(metrics_path: str, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, eval_steps, eval_losses = [], [], [], []
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            steps.append(row["step"])
            losses.append(row["loss"])
            if "eval_loss" in row:
                eval_steps.append(row["step"])
                eval_losses.append(row["eval_loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, marker=".", linewidth=1, label="training loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, marker="o", linewidth=1.5, label="eval loss")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(out_path))) or "loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
