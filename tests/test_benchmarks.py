"""``make benchmark`` (benchmarks/run_all.py) runs benchmarks and writes results.md and the chart.

Here on one benchmark at a toy size (the figures themselves are not asserted: performance is
measured by the benchmarks, not by unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys

from recipe_helpers import ROOT


def test_make_benchmark_writes_results_table_and_chart(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/run_all.py", "--only", "lora_linear", "--extra",
                          "lora_linear=--dim 128 --rounds 2 --iters 1 --dropout 0.1", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    assert "| `python benchmarks/lora_linear.py` | LoRA Linear 128², r=16, dropout 0.1: time ours/peft |" in table
    assert "bytes saved for backward ours/peft" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the raw rows are kept, so a later --only run replaces just its own benchmark's rows
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["benchmark"] for r in rows} == {"lora_linear"} and len(rows) == 6
    with open(f"{ROOT}/Makefile", encoding="utf-8") as fh:
        assert "\t$(PY) benchmarks/run_all.py\n" in fh.read()


def test_run_all_names_a_bad_extra():
    res = subprocess.run([sys.executable, "benchmarks/run_all.py", "--only", "lora_linear", "--extra", "nope=--x 1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "--extra 'nope=--x 1'" in res.stderr and "Traceback" not in res.stderr
