"""Training data: tokenized samples, padded or packed rows, and the world-size-independent order.

The rows of optimizer step ``s`` are a pure function of (seed, s, global_batch_size, data
size): a seeded permutation per epoch, sliced by step. Each rank takes a contiguous share of
that global batch and splits it into micro batches; gradient accumulation covers the rest. So
the same seed and global batch give the same rows per step at any world size or micro batch.
With ``data.packing`` a row holds several samples (recipe/packing.py); the order is over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import RecipeError
from .formats import Sample


def global_batch_indices(step: int, num_samples: int, global_batch_size: int, seed: int) -> list[int]:
    """Row indices of optimizer step ``step`` (0-based): epoch-wise seeded permutations."""
    per_epoch = num_samples // global_batch_size
    if per_epoch == 0:
        raise RecipeError(f"the data set has {num_samples} rows, fewer than train.global_batch_size "
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
    input_ids: torch.Tensor                 # [b, seq_len]
    attention_mask: Optional[torch.Tensor]  # [b, seq_len]; None for packed rows (position_ids tell the samples)
    labels: torch.Tensor                    # [b, seq_len], -100 where no loss
    position_ids: Optional[torch.Tensor] = None  # packed rows: restarting at 0 for every sample

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device))
        return Batch(self.input_ids.to(device), move(self.attention_mask), self.labels.to(device),
                     move(self.position_ids))

    def target_tokens(self) -> int:
        """Tokens that carry loss after the causal shift."""
        return int((self.labels[:, 1:] != -100).sum())

    def model_inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs


class TokenizedData:
    """Samples cut to ``seq_len`` tokens, one per row, padded. ``cut``: indices of the samples that
    were longer (their end is not trained on); ``no_target``: samples without a loss-carrying
    token after the first (nothing to predict)."""

    packed = False

    def __init__(self, samples: list[Sample], seq_len: int, pad_id: int) -> None:
        self.samples = samples
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.cut = frozenset(i for i, s in enumerate(samples) if len(s.ids) > seq_len)
        self.rows = [s.ids[:seq_len] for s in samples]
        self.labels = [s.labels[:seq_len] for s in samples]
        self.no_target = frozenset(i for i, labels in enumerate(self.labels) if all(t == -100 for t in labels[1:]))

    def __len__(self) -> int:
        return len(self.samples)

    def truncated_in(self, indices: list[int]) -> int:
        return sum(i in self.cut for i in indices)

    def summary(self, where: str) -> str:
        """One line for the start of a run: how many samples, and how many are cut."""
        share = f"{len(self.cut)} of {len(self)} ({100 * len(self.cut) / len(self):.1f}%)"
        line = f"data: {len(self)} samples from {where}; {share} longer than data.seq_len {self.seq_len} tokens"
        line += " are cut (their end is not trained on)" if self.cut else ""
        if self.no_target:
            line += f"; {len(self.no_target)} carry no loss"
        return line

    def batch(self, indices: list[int]) -> Batch:
        ids = torch.full((len(indices), self.seq_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), self.seq_len), dtype=torch.long)
        labels = torch.full((len(indices), self.seq_len), -100, dtype=torch.long)
        for r, i in enumerate(indices):
            row = self.rows[i]
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = 1
            labels[r, : len(row)] = torch.tensor(self.labels[i], dtype=torch.long)
        return Batch(ids, mask, labels)
