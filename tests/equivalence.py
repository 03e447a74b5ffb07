"""The signature check: a run under some strategy and world size trained what the single-process
run trained. Three parts, each able to see what the others cannot:

- step-1 ``loss`` (relative 1e-6): the loss normalisation over the global batch;
- step-1 ``grad_norm`` (relative 1e-6, before clipping): the gradient's scale, which a wrong
  ``/ world size`` or a doubled reduction changes and clipped Adam would hide;
- the final adapter (absolute, per test): after plain SGD the difference is proportional to the
  gradient difference; after AdamW it shows wrong directions, not wrong scales.

And an independent oracle for the loss itself: transformers' own ``model(labels=...)`` (and
peft's model for a trained checkpoint) over the same global batch, tokenised here.
"""

from __future__ import annotations

import json
import os

import torch

from recipe_helpers import adapter_tensors

# measured 0 to 9e-8 relative for every strategy (issue 15 asks for 1e-5 at most)
METRIC_RTOL = 1e-6
# verify's probe logits, the live sharded model vs one fresh process: measured 0 (QLoRA) to 2e-6
# on every strategy's recipe run (the CLI's fp32 default, 1e-4, leaves room for real models)
VERIFY_ATOL = 2e-5


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _adapter(run_dir, step: int | None):
    """The adapter a run holds after ``step`` (None: its final one)."""
    if step is None:
        return adapter_tensors(run_dir)
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "checkpoints", f"step_{step}", "adapter", "adapter_model.safetensors"))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def equivalence_report(run, reference, adapter_tol: float) -> dict[str, tuple[float, float]]:
    """{part: (measured, tolerance)} for a run against the reference: the loss and gradient norm of
    the run's first step, and its adapter. The run's adapter is compared
    with the reference's at the run's last step (the final adapter, or a checkpoint of a longer
    reference)."""
    ours, ref = metrics(run), metrics(reference)
    # the run's first step (1, or the step after the checkpoint a resumed run started from)
    first = next((row for row in ref if ours and row["step"] == ours[0]["step"]), None)
    assert first is not None, (run, reference)
    last = ours[-1]["step"]
    a, b = adapter_tensors(run), _adapter(reference, None if ref[-1]["step"] == last else last)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    return {"loss": (_rel(ours[0]["loss"], first["loss"]), METRIC_RTOL),
            "grad_norm": (_rel(ours[0]["grad_norm"], first["grad_norm"]), METRIC_RTOL),
            "adapter": (max((a[k] - b[k]).abs().max().item() for k in a), adapter_tol)}


def failing_parts(report: dict) -> list[str]:
    return [part for part, (measured, tol) in report.items() if not measured <= tol]


def assert_equivalent(run, reference, adapter_tol: float, label: str = "") -> dict:
    """The three parts above, and (issue 22) ``dist-adapters verify`` of the run: its adapter's
    hashes and the live sharded model's probe logits, reproduced in this single process."""
    from dist_adapters.verify_cmd import verify

    report = equivalence_report(run, reference, adapter_tol)
    parts = ", ".join(f"{part} {measured:.2e} (tol {tol:.0e})" for part, (measured, tol) in report.items())
    print(f"{label}: {parts}")
    assert not failing_parts(report), (label, report)
    with open(os.path.join(run, "adapter", "verification.json"), encoding="utf-8") as fh:
        record = json.load(fh)
    fp32 = record["base_dtype"] == record["logits"]["dtype"] == "float32"
    print(f"{label}: verify: {verify(str(run), atol=VERIFY_ATOL if fp32 else None)}")
    return report


# ----------------------------------------------------------------------------- the loss oracle

def global_batch(run_dir, step: int):
    """(input_ids, attention_mask, labels) of optimizer step ``step`` (1-based) of a finished run,
    from its recipe.json: the sample order of dist_adapters.recipe.data (the contract), the
    tokenisation written out here (text + eos, truncated to seq_len, right-padded; for
    prompt/completion records the prompt's own tokens carry no label)."""
    from transformers import AutoTokenizer

    from dist_adapters.recipe import builtin
    from dist_adapters.recipe.data import global_batch_indices

    cfg = json.loads(open(os.path.join(run_dir, "recipe.json"), encoding="utf-8").read())
    with open(cfg["data"]["path"] or builtin.DATA_FILE, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    tr, seq_len = cfg["train"], cfg["data"]["seq_len"]
    tok = AutoTokenizer.from_pretrained(os.path.join(run_dir, "base_model"))
    ids = torch.full((tr["global_batch_size"], seq_len), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, index in enumerate(global_batch_indices(step - 1, len(records), tr["global_batch_size"], tr["seed"])):
        record = records[index]
        text = record["text"] if "text" in record else record["prompt"] + record["completion"]
        unlabelled = 0 if "text" in record else len(tok(record["prompt"])["input_ids"])
        tokens = tok(text)["input_ids"]
        tokens = (tokens if tokens[-1] == tok.eos_token_id else tokens + [tok.eos_token_id])[:seq_len]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        labels[row, unlabelled:len(tokens)] = torch.tensor(tokens[unlabelled:], dtype=torch.long)
    return ids, mask, labels


@torch.no_grad()
def transformers_loss(run_dir, step: int, adapter_dir=None) -> float:
    """transformers' mean token cross-entropy over the whole global batch of ``step`` in one
    forward, on ``run_dir/base_model`` (the adapter's no-op init) or with peft's ``adapter_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "base_model"))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids, mask, labels = global_batch(run_dir, step)
    return model.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
