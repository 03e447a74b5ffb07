"""``data.packing``: samples concatenated into rows of ``seq_len`` tokens.

Rows are filled best-fit over the samples sorted longest first (a stable, seed-free order), so
the packing is a pure function of the data and the optimizer step's rows stay a pure function
of (seed, step, global batch). Inside a row, position ids restart at 0 with every sample;
transformers reads that (with no attention mask and no cache) as separate sequences and builds
a block-diagonal causal mask (sdpa, eager; flash-attention's varlen path on CUDA). The first
token of every sample carries no label, so no sample predicts from the one before it: a packed
row gives each sample the loss it has alone.
"""

from __future__ import annotations

import bisect

import torch

from .data import Batch, TokenizedData


def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Sample indices per row: best fit (the fullest row that still has room), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            if room - need:
                bisect.insort(free, (room - need, row))
        else:
            rows.append([i])
            if seq_len - need:
                bisect.insort(free, (seq_len - need, len(rows) - 1))
    return rows


class PackedData:
    """The samples of a TokenizedData (already cut to seq_len) packed into rows."""

    packed = True

    def __init__(self, data: TokenizedData) -> None:
        self.data = data
        self.seq_len = data.seq_len
        self.row_samples = pack_rows([len(row) for row in data.rows], data.seq_len)
        self.cut = data.cut

    def __len__(self) -> int:
        return len(self.row_samples)

    def efficiency(self) -> float:
        """Tokens of samples over the rows' capacity."""
        return sum(len(row) for row in self.data.rows) / (len(self) * self.seq_len)

    def truncated_in(self, indices: list[int]) -> int:
        return sum(s in self.cut for i in indices for s in self.row_samples[i])

    def summary(self, where: str) -> str:
        return (self.data.summary(where) + f"; packed into {len(self)} rows of {self.seq_len} tokens "
                f"({100 * self.efficiency():.1f}% filled)")

    def batch(self, indices: list[int]) -> Batch:
        shape = (len(indices), self.seq_len)
        ids = torch.full(shape, self.data.pad_id, dtype=torch.long)
        labels = torch.full(shape, -100, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        for r, i in enumerate(indices):
            at = 0
            for s in self.row_samples[i]:
                row, row_labels = self.data.rows[s], self.data.labels[s]
                ids[r, at:at + len(row)] = torch.tensor(row, dtype=torch.long)
                labels[r, at + 1:at + len(row)] = torch.tensor(row_labels[1:], dtype=torch.long)
                positions[r, at:at + len(row)] = torch.arange(len(row))
                at += len(row)
            positions[r, at:] = torch.arange(self.seq_len - at)  # the padding: one more sequence, no loss
        return Batch(ids, None, labels, positions)
