"""DeepSpeed ZeRO-1/2/3 checkpoints, read one parameter at a time.

Layout (``engine.save_checkpoint(DIR, tag)``):

    DIR/latest                                          the newest tag, e.g. "global_step100"
    DIR/TAG/mp_rank_00_model_states.pt                  stage 1/2: module state, param_shapes, ...
    DIR/TAG/zero_pp_rank_{r}_mp_rank_00_model_states.pt stage 3: one per data-parallel rank
    DIR/TAG/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   one per rank: the fp32 master
                                                         partitions, Adam moments, ZeRO metadata

The trainable parameters' fp32 masters live in the optimizer files, named by ``param_shapes``
(one ordered {name: shape} per parameter group, in the model states):

- stage 1/2: each group is one flat vector, cut into ``world_size`` equal partitions
  (``single_partition_of_fp32_groups[g]`` on rank r); parameters follow one another in
  param_shapes order, each followed by ``param_alignment_paddings[g][i]`` (when recorded), the
  whole vector padded to a multiple of 2 * world_size.
- stage 3: every parameter is cut into ``ceil(numel / world_size)`` pieces, padded at the end;
  rank r's ``fp32_flat_groups`` (concatenated over groups) holds its piece of each parameter
  in param_shapes order.

Frozen parameters (``frozen_param_shapes``) live in the model states' ``frozen_param_fragments``
(stage 3: one piece per rank as above; stage 1/2: whole tensors). All files are opened with
``mmap=True``: only the slices read here are paged in, never the frozen base weights or the
Adam moments next to them. The files are read by torch_zip (numpy, no torch import); tensors
come back as numpy arrays.
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

import numpy as np

from .allow_list import CheckpointError
from .torch_zip import load as load_torch

_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def is_zero_dir(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "latest")):
        return True
    return any(_OPTIM.match(n) for n in os.listdir(path))


def resolve_tag(path: str, tag: Optional[str]) -> tuple[str, str]:
    """(directory holding the rank files, tag): ``--tag``, else the ``latest`` file, else the
    directory itself when it holds the rank files, else its only tag directory."""
    if any(_OPTIM.match(n) for n in os.listdir(path)) and tag is None:
        return path, os.path.basename(os.path.normpath(path))
    if tag is None and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest"), encoding="utf-8") as fh:
            tag = fh.read().strip()
        if not os.path.isdir(os.path.join(path, tag)):
            raise FileNotFoundError(f"{os.path.join(path, 'latest')} names tag {tag!r}, but "
                                    f"{os.path.join(path, tag)} does not exist")
    if tag is None:
        tags = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)) and is_zero_dir(
            os.path.join(path, n)))
        if len(tags) != 1:
            raise ValueError(f"{path}: no 'latest' file and {len(tags)} tag directories {tags[:5]}; "
                             "choose one with --tag")
        tag = tags[0]
    directory = os.path.join(path, tag)
    if not os.path.isdir(directory):
        tags = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
        raise FileNotFoundError(f"{directory}: no such tag; {path} holds {tags[:10]}")
    return directory, tag


class ZeroCheckpoint:
    """Names, shapes and lazily read full tensors of one ZeRO checkpoint tag."""

    format = "deepspeed"
    outer_prefix = ""

    def __init__(self, path: str, tag: Optional[str] = None) -> None:
        self.root = path
        self.dir, self.tag = resolve_tag(path, tag)
        files = {}
        for name in sorted(os.listdir(self.dir)):
            found = _OPTIM.match(name)
            if found:
                if int(found[2]) != 0:
                    raise CheckpointError(f"{os.path.join(self.dir, name)}: model-parallel rank {int(found[2])}; "
                                          "DeepSpeed checkpoints with tensor/pipeline parallelism are not supported")
                files[int(found[1])] = os.path.join(self.dir, name)
        if not files:
            raise FileNotFoundError(f"{self.dir}: no *_optim_states.pt files (not a ZeRO checkpoint, "
                                    "or saved without the optimizer)")
        first = files[min(files)]
        optim0 = self._optim(first)
        self.stage = int(optim0["zero_stage"])
        count = optim0["partition_count"]
        self.world_size = max(count) if isinstance(count, (list, tuple)) else int(count)
        for r in range(self.world_size):
            if r not in files:
                pattern = os.path.basename(first).replace(f"zero_pp_rank_{min(files)}_", f"zero_pp_rank_{r}_")
                raise FileNotFoundError(f"{os.path.join(self.dir, pattern)}: missing; {first} says the "
                                        f"checkpoint was written by {self.world_size} ranks")
        extra = sorted(set(files) - set(range(self.world_size)))
        if extra:
            raise CheckpointError(f"{files[extra[0]]}: rank {extra[0]} does not belong to this checkpoint: "
                                  f"{first} says world size {self.world_size} (mismatched world size; "
                                  "a leftover from another run?)")
        self.optim_files = [files[r] for r in range(self.world_size)]
        self.alignment_paddings = optim0.get("param_alignment_paddings")  # stage 1/2, when recorded
        self.groups = [self._groups(optim0, first)] + [
            self._groups(self._optim(f), f) for f in self.optim_files[1:]]
        self._read_model_states()
        self._layout()

    # -- files --------------------------------------------------------------------------------
    def _optim(self, path: str) -> dict:
        data = load_torch(path)
        osd = data.get("optimizer_state_dict") if isinstance(data, dict) else None
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise CheckpointError(f"{path}: not a ZeRO optimizer state file (no optimizer_state_dict.zero_stage)")
        return osd

    def _groups(self, osd: dict, path: str) -> list[np.ndarray]:
        key = "fp32_flat_groups" if int(osd["zero_stage"]) == 3 else "single_partition_of_fp32_groups"
        groups = osd.get(key)
        if not isinstance(groups, (list, tuple)) or not all(isinstance(t, np.ndarray) for t in groups):
            raise CheckpointError(f"{path}: no {key} (a stage {self.stage} optimizer file should have it)")
        if int(osd["zero_stage"]) != self.stage:
            raise CheckpointError(f"{path}: ZeRO stage {int(osd['zero_stage'])}, rank 0's file says {self.stage}")
        count = osd["partition_count"]
        world = max(count) if isinstance(count, (list, tuple)) else int(count)
        if world != self.world_size:
            raise CheckpointError(f"{path}: written with world size {world}, rank 0's file says {self.world_size} "
                                  "(mismatched world size)")
        return list(groups)

    def _read_model_states(self) -> None:
        if self.stage <= 2:
            paths = [os.path.join(self.dir, "mp_rank_00_model_states.pt")]
        else:
            paths = [os.path.join(self.dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
                     for r in range(self.world_size)]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing (stage {self.stage}, world size {self.world_size})")
        states = [load_torch(p) for p in paths]
        for path, state in zip(paths, states):
            if not isinstance(state, dict) or "param_shapes" not in state:
                raise CheckpointError(f"{path}: not a DeepSpeed model state file (no param_shapes)")
            dp = state.get("dp_world_size")
            if dp is not None and int(dp) != self.world_size:
                raise CheckpointError(f"{path}: dp_world_size {dp}, but the optimizer files are for "
                                      f"{self.world_size} ranks (mismatched world size)")
        self.model_files = paths
        self.param_shapes = [dict(group) for group in states[0]["param_shapes"]]
        self.frozen_shapes = dict(states[0].get("frozen_param_shapes") or {})
        self.frozen = [state.get("frozen_param_fragments") or {} for state in states]
        self.ds_version = states[0].get("ds_version")
        self.shapes = {n: tuple(s) for g in self.param_shapes for n, s in g.items()}
        self.shapes.update({n: tuple(s) for n, s in self.frozen_shapes.items()})
        self.names = list(self.shapes)

    # -- where each trainable parameter sits -----------------------------------------------------
    def _layout(self) -> None:
        """name -> (group, start) in the stage-1/2 full group vector, or the per-rank start at stage 3."""
        self.where: dict[str, tuple[int, int]] = {}
        if len(self.param_shapes) != len(self.groups[0]) and self.stage <= 2:
            raise CheckpointError(f"{self.model_files[0]}: {len(self.param_shapes)} parameter groups, "
                                  f"{self.optim_files[0]} has {len(self.groups[0])}")
        for r, groups in enumerate(self.groups[1:], start=1):
            if [t.size for t in groups] != [t.size for t in self.groups[0]]:
                raise CheckpointError(f"{self.optim_files[r]}: partition sizes {[t.size for t in groups]} differ "
                                      f"from rank 0's {[t.size for t in self.groups[0]]} (truncated or from "
                                      "another run?)")
        if self.stage <= 2:
            for g, shapes in enumerate(self.param_shapes):
                offset = 0
                pads = self.alignment_paddings[g] if self.alignment_paddings else [0] * len(shapes)
                for i, (name, shape) in enumerate(shapes.items()):
                    self.where[name] = (g, offset)
                    offset += math.prod(shape) + pads[i]
                total = self.groups[0][g].size * self.world_size
                align = 2 * self.world_size
                if align * math.ceil(offset / align) != align * math.ceil(total / align):
                    raise CheckpointError(f"{self.optim_files[0]}: group {g} holds {total} values for "
                                          f"{offset} parameter values (mismatched world size or shapes)")
        else:
            offset = 0
            for shapes in self.param_shapes:
                for name, shape in shapes.items():
                    self.where[name] = (0, offset)
                    offset += math.ceil(math.prod(shape) / self.world_size)
            total = sum(t.size for t in self.groups[0])
            if offset != total:
                raise CheckpointError(f"{self.optim_files[0]}: holds {total} values per rank, the parameters "
                                      f"need {offset} (mismatched world size or shapes)")

    # -- reading ----------------------------------------------------------------------------------
    def _flat(self, start: int, length: int, groups: list[np.ndarray]) -> np.ndarray:
        """``length`` values from ``start`` of one rank's groups laid end to end (stage 3)."""
        pieces, base = [], 0
        for t in groups:
            lo, hi = max(start, base), min(start + length, base + t.size)
            if lo < hi:
                pieces.append(t[lo - base: hi - base])
            base += t.size
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def read(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        numel = math.prod(shape)
        if name in self.frozen_shapes:
            if self.stage <= 2:
                return np.array(self.frozen[0][name].reshape(shape))
            return np.concatenate([frozen[name] for frozen in self.frozen])[:numel].reshape(shape)
        g, start = self.where[name]
        if self.stage <= 2:
            size = self.groups[0][g].size
            pieces = []
            for r in range(start // size, (start + numel - 1) // size + 1):
                lo, hi = max(start, r * size), min(start + numel, (r + 1) * size)
                pieces.append(self.groups[r][g][lo - r * size: hi - r * size])
            flat = np.concatenate(pieces)
        else:
            piece = math.ceil(numel / self.world_size)
            flat = np.concatenate([self._flat(start, piece, self.groups[r]) for r in range(self.world_size)])[:numel]
        return np.array(flat.reshape(shape))  # a copy: the memory maps are released

    def describe(self) -> dict:
        return {"format": f"DeepSpeed ZeRO-{self.stage}", "path": self.dir, "tag": self.tag,
                "world_size": self.world_size, "stage": self.stage, "deepspeed_version": self.ds_version,
                "files": len(self.optim_files) + len(self.model_files)}
