"""Training data: JSONL texts, tokenisation, and the world-size-independent sample order.

The samples of optimizer step ``s`` are a pure function of (seed, s, global_batch_size, data
size): a seeded permutation per epoch, sliced by step. Each rank takes a contiguous share of
that global batch and splits it into micro batches; gradient accumulation covers the rest. So
the same seed and global batch give the same samples per step at any world size or micro batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .config import RecipeError


def read_jsonl(path: str) -> list[str]:
    """Every line a JSON object with a string "text"; blank lines are skipped."""
    texts: list[str] = []
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise RecipeError(f"data.path {path!r}: cannot read ({exc.strerror or exc})") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecipeError(f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line: "
                                  f"{raw[exc.start:exc.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise RecipeError(f'{path}:{number}: expected an object with a string "text" field')
            texts.append(obj["text"])
    if not texts:
        raise RecipeError(f"{path}: no samples")
    return texts


def global_batch_indices(step: int, num_samples: int, global_batch_size: int, seed: int) -> list[int]:
    """Sample indices of optimizer step ``step`` (0-based): epoch-wise seeded permutations."""
    per_epoch = num_samples // global_batch_size
    if per_epoch == 0:
        raise RecipeError(f"the data set has {num_samples} samples, fewer than train.global_batch_size "
                          f"({global_batch_size})")
    epoch, offset = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=gen)
    return perm[offset * global_batch_size:(offset + 1) * global_batch_size].tolist()


def micro_batches(indices: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    share = len(indices) // world_size
    mine = indices[rank * share:(rank + 1) * share]
    return [mine[i:i + micro_batch_size] for i in range(0, share, micro_batch_size)]


@dataclass
class Batch:
    input_ids: torch.Tensor       # [b, seq_len]
    attention_mask: torch.Tensor  # [b, seq_len]
    labels: torch.Tensor          # [b, seq_len], -100 where no loss

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def target_tokens(self) -> int:
        """Tokens that carry loss after the causal shift."""
        return int((self.labels[:, 1:] != -100).sum())


class TextData:
    """The texts tokenized once (an EOS appended), cut to ``seq_len`` tokens. ``cut``: indices of
    the samples that were longer (their end and EOS are not trained on); ``no_target``: indices
    of samples of one token or none, which carry no loss."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int) -> None:
        self.texts = texts
        self.seq_len = seq_len
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        eos = tokenizer.eos_token_id
        full = [ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]
                for ids in tokenizer(texts)["input_ids"]]
        self.cut = frozenset(i for i, ids in enumerate(full) if len(ids) > seq_len)
        self.rows = [ids[:seq_len] for ids in full]
        self.no_target = frozenset(i for i, ids in enumerate(self.rows) if len(ids) < 2)

    def __len__(self) -> int:
        return len(self.texts)

    def summary(self, where: str) -> str:
        """One line for the start of a run: how many samples, and how many are cut."""
        share = f"{len(self.cut)} of {len(self)} ({100 * len(self.cut) / len(self):.1f}%)"
        line = f"data: {len(self)} samples from {where}; {share} longer than data.seq_len {self.seq_len} tokens"
        line += " are cut (their end and EOS are not trained on)" if self.cut else ""
        if self.no_target:
            line += f"; {len(self.no_target)} have fewer than 2 tokens and carry no loss"
        return line

    def batch(self, indices: list[int]) -> Batch:
        rows = [self.rows[i] for i in indices]
        ids = torch.full((len(rows), self.seq_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.seq_len), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return Batch(ids, mask, labels)
