"""``make benchmark``: run every benchmark, collect the ratio rows each prints (``report.emit``),
and write ``benchmarks/results.md`` (a table: median with min / max over rounds, the target, met
or not) and ``benchmarks/results.png`` (a bar chart of the median ratios, min-max as error bars,
targets marked). The rows themselves are kept in ``benchmarks/results.jsonl``; ``--only`` reruns
some benchmarks and replaces just their rows.

    python benchmarks/run_all.py                       # everything (about 20 minutes on 2 CPU cores)
    python benchmarks/run_all.py --only lora_linear train_step
    python benchmarks/run_all.py --only lora_linear --extra "lora_linear=--dim 512 --rounds 1"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("lora_linear", "train_step", "dora", "moe_lora", "fsdp_step", "trainable_tokens_memory", "loftq",
              "consolidate")


def _met(row: dict) -> str:
    target = row["target"]
    if not target:
        return ""
    limit = float(target.split()[-1])
    return "yes" if row["median"] <= limit else "**no**"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| benchmark | ratio | median | min | max | rounds | target | met | setting |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['command']}` | {r['row']} | **{r['median']:.3f}** | {r['min']:.3f} | {r['max']:.3f} | "
                     f"{r['rounds']} | {r['target'] or ''} | {_met(r)} | {r['detail']} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # ratios of ours to a reference only (overhead fractions stay in the table); no NaN rows
    shown = [r for r in rows if "/" in r["row"].split(":")[-1] and r["median"] == r["median"]]
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(shown) + 1.2))
    ys = range(len(shown))
    med = [r["median"] for r in shown]
    err = [[r["median"] - r["min"] for r in shown], [r["max"] - r["median"] for r in shown]]
    ax.barh(ys, med, xerr=err, color="#4c72b0", capsize=3)
    for y, r in zip(ys, shown):
        if r["target"]:
            limit = float(r["target"].split()[-1])
            ax.plot([limit, limit], [y - 0.4, y + 0.4], color="#c44e52", linewidth=2)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlim(min(0.0, min(med)), min(2.0, max(1.2, max(r["max"] for r in shown))))  # a wild max stays readable
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r["row"][:90] for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio, median (bars: min-max over rounds; red: target)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _merge(path: str, rows: list[dict], rerun: list[str]) -> list[dict]:
    """Rows of the benchmarks not rerun, kept from ``path``, then the new rows (in BENCHMARKS
    order); written back to ``path`` atomically."""
    kept = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            kept = [r for r in map(json.loads, filter(str.strip, fh)) if r["benchmark"] not in rerun]
    merged = sorted(kept + rows, key=lambda r: BENCHMARKS.index(r["benchmark"]))
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in merged)
    os.replace(path + ".tmp", path)
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                    help="extra arguments for one benchmark, e.g. 'lora_linear=--rounds 9'")
    ap.add_argument("--out", default=HERE, help="where results.md and results.png go")
    args = ap.parse_args()
    extra = {}
    for item in args.extra:
        name, _, rest = item.partition("=")
        if name not in BENCHMARKS:
            ap.error(f"--extra {item!r}: {name!r} is not one of {', '.join(BENCHMARKS)}")
        extra[name] = shlex.split(rest)
    os.makedirs(args.out, exist_ok=True)
    fd, results = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    env = {**os.environ, "DA_BENCH_RESULTS": results}
    started = time.time()
    try:
        for name in args.only:
            cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *extra.get(name, [])]
            print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
            if subprocess.call(cmd, env=env):
                sys.exit(f"run_all.py: benchmarks/{name}.py failed")
        with open(results, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    finally:
        os.unlink(results)
    rows = _merge(os.path.join(args.out, "results.jsonl"), rows, args.only)
    import torch

    header = (f"# Benchmark results\n\nWritten by `make benchmark` (benchmarks/run_all.py) on "
              f"{time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}; this run: {', '.join(args.only)} "
              f"({time.time() - started:.0f} s). Each ratio is ours over the reference, taken per round with "
              "the sides interleaved.")
    md = os.path.join(args.out, "results.md")
    with open(md + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(markdown(rows, header))
    os.replace(md + ".tmp", md)
    chart(rows, os.path.join(args.out, "results.png"))
    print(f"[run_all] {len(rows)} rows -> {md} and results.png")


if __name__ == "__main__":
    main()
