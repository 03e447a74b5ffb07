"""Consolidating a ZeRO-3 checkpoint's adapter: `dist-adapters consolidate` vs DeepSpeed's
`zero_to_fp32.py --exclude_frozen_parameters` (the script DeepSpeed copies next to every
checkpoint), each in its own subprocess, interleaved; wall time and peak RSS (ru_maxrss of that
one child). Target: ours <= 0.5x the time, peak RSS <= adapter size + 200 MB.

The checkpoint: a Llama of ~50M frozen parameters (hidden 768, 8 layers, MLP 2048) with LoRA
r=16 (down_proj r=17) on every linear layer (~1.8M trainable), trained one step under
`deepspeed.initialize` ZeRO-3 on 2 ranks and saved with `save_checkpoint` (written once into
--workdir, reused by later runs).

    python benchmarks/consolidate.py [--repeats 3] [--workdir /tmp/da_bench_consolidate]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from report import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--hidden", "768", "--inter", "2048", "--layers", "8", "--lora-rank", "16", "--steps", "1"]

# Runs one command as its only child and reports that child's wall time and peak RSS.
MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "err": proc.stderr[-2000:],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_checkpoint(work: str) -> str:
    ckpt = os.path.join(work, "ckpt")
    if os.path.isfile(os.path.join(ckpt, "latest")):
        return ckpt
    shutil.rmtree(work, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    print(f"writing the ZeRO-3 checkpoint into {work} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(ROOT, "tests", "dist", "write_checkpoints.py"), "zero", "ours", work, "--stage", "3",
                    *MODEL], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return ckpt


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['err']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/da_bench_consolidate")
    args = parser.parse_args()
    ckpt = write_checkpoint(args.workdir)

    import torch
    from safetensors.torch import load_file

    from dist_adapters.checkpoint.zero_reader import ZeroCheckpoint

    zc = ZeroCheckpoint(ckpt)
    frozen = sum(torch.Size(s).numel() for s in zc.frozen_shapes.values())
    trainable = sum(torch.Size(s).numel() for g in zc.param_shapes for s in g.values())
    adapter_mb = trainable * 4 / 2**20
    on_disk = sum(os.path.getsize(os.path.join(zc.dir, f)) for f in os.listdir(zc.dir)) / 2**20
    print(f"checkpoint: ZeRO-{zc.stage}, {zc.world_size} ranks, {frozen / 1e6:.1f}M frozen + {trainable / 1e6:.2f}M "
          f"adapter parameters ({adapter_mb:.1f} MB fp32), {on_disk:.0f} MB on disk")

    ours_out, ref_out = os.path.join(args.workdir, "ours"), os.path.join(args.workdir, "zero_to_fp32")
    ours_cmd = [sys.executable, "-m", "dist_adapters.cli", "consolidate", ckpt, ours_out, "--quiet"]
    ref_cmd = [sys.executable, os.path.join(ckpt, "zero_to_fp32.py"), ckpt, ref_out, "--exclude_frozen_parameters",
               "--safe_serialization"]
    rows = {"ours": [], "zero_to_fp32": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for name, cmd in (("ours", ours_cmd), ("zero_to_fp32", ref_cmd)):
            shutil.rmtree(ours_out if name == "ours" else ref_out, ignore_errors=True)
            rows[name].append(measure(cmd))

    # the same tensors: ours under peft keys, zero_to_fp32 under the model's parameter names
    ours = load_file(os.path.join(ours_out, "adapter_model.safetensors"))
    ref = {}
    for f in sorted(os.listdir(ref_out)):
        if f.endswith(".safetensors"):
            ref.update(load_file(os.path.join(ref_out, f)))
    mapped = {"base_model.model." + k.replace(".default.", "."): v for k, v in ref.items()}
    equal = sorted(mapped) == sorted(ours) and all(torch.equal(ours[k], mapped[k]) for k in ours)

    med = {n: (statistics.median(r["wall_s"] for r in rs), max(r["maxrss_mb"] for r in rs)) for n, rs in rows.items()}
    base = measure([sys.executable, "-c", "import torch"])["maxrss_mb"]
    print(f"{'':14}{'time s (median)':>16}{'peak RSS MB':>13}")
    for name, (wall, rss) in med.items():
        print(f"{name:14}{wall:16.2f}{rss:13.0f}")
    print(f"tensors equal: {equal} ({len(ours)} tensors)")
    print(f"time ratio ours/zero_to_fp32: {med['ours'][0] / med['zero_to_fp32'][0]:.3f}  (target <= 0.5)")
    print(f"RSS ratio ours/zero_to_fp32:  {med['ours'][1] / med['zero_to_fp32'][1]:.3f}")
    budget = adapter_mb + 200
    times = [o["wall_s"] / z["wall_s"] for o, z in zip(rows["ours"], rows["zero_to_fp32"])]
    emit("consolidate", "adapter out of a ZeRO-3 checkpoint: time ours/zero_to_fp32", times, "<= 0.5",
         f"tensors equal: {equal}", "python benchmarks/consolidate.py")
    emit("consolidate", "adapter out of a ZeRO-3 checkpoint: peak RSS ours/zero_to_fp32",
         [med["ours"][1] / med["zero_to_fp32"][1]], None, f"ours {med['ours'][1]:.0f} MB", "python benchmarks/consolidate.py")
    print(f"peak RSS ours {med['ours'][1]:.0f} MB vs target adapter + 200 MB = {budget:.0f} MB: "
          f"{'met' if med['ours'][1] <= budget else 'NOT met'}  (python + `import torch` alone: {base:.0f} MB)")


if __name__ == "__main__":
    main()
