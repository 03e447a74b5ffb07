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
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"data.path {path!r}: cannot read ({exc.strerror or exc})") from None
    with fh:
        for number, line in enumerate(fh, start=1):
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
    def __init__(self, texts: list[str], tokenizer, seq_len: int) -> None:
        self.texts = texts
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def __len__(self) -> int:
        return len(self.texts)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        return ids[: self.seq_len]

    def batch(self, indices: list[int]) -> Batch:
        rows = [self.encode(self.texts[i]) for i in indices]
        ids = torch.full((len(rows), self.seq_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.seq_len), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return Batch(ids, mask, labels)
