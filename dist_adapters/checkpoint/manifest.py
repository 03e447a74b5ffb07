"""Checksums of what we write, checked wherever we read it back (issue 22).

Two kinds, both sha256:

- **Per tensor, inside a safetensors file** (every ``adapter_model.safetensors`` we write:
  ``save_adapter``, ``consolidate``): the header's ``__metadata__`` gains
  ``"dist_adapters.sha256"``, a JSON object {key: sha256 of the tensor's raw little-endian bytes}.
  peft, transformers and vLLM ignore metadata they do not know, so the file loads there as it is;
  ``read_adapter_weights`` (load_adapter, resume, consolidate and verify of a PEFT directory)
  checks every tensor against it. A file without it (written by someone else) is read unchecked.
- **Per file, for a training checkpoint** (``checkpoints/step_N/manifest.json``): {relative path:
  sha256} of every file in the directory when it was complete (adapter, optimizer state, DCP
  shards, DeepSpeed files, RNG), checked by resume and by ``consolidate`` of the directory.
  Engine files (DCP's ``.distcp``, DeepSpeed's pickles) have no checksum of their own, and a
  file hash also covers their metadata.

Torch-free (numpy arrays and torch tensors are both hashed through the buffer protocol), so
the offline consolidation path keeps its no-torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from .allow_list import CheckpointError

TENSOR_SHA_KEY = "dist_adapters.sha256"
MANIFEST_NAME = "manifest.json"


def tensor_sha256(t: Any) -> str:
    """sha256 of a tensor's (or array's) bytes, C order, as safetensors stores them."""
    import numpy as np

    if not isinstance(t, np.ndarray):  # a torch tensor: its bytes without a dtype numpy may lack
        t = t.detach().cpu().contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
    return hashlib.sha256(np.ascontiguousarray(t).reshape(-1).view(np.uint8).data).hexdigest()


def tensor_manifest(tensors: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata carrying each tensor's sha256."""
    return {TENSOR_SHA_KEY: json.dumps({k: tensor_sha256(v) for k, v in sorted(tensors.items())},
                                       separators=(",", ":"))}


def check_tensors(tensors: dict[str, Any], metadata: Optional[dict], path: str) -> bool:
    """Raise CheckpointError naming the first key whose bytes differ from the recorded sha256, a
    recorded key that is missing, or a key with no record. Returns whether a manifest was there."""
    recorded_text = (metadata or {}).get(TENSOR_SHA_KEY)
    if recorded_text is None:
        return False
    try:
        recorded = json.loads(recorded_text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its {TENSOR_SHA_KEY} metadata is not valid JSON ({exc})") from None
    found = first_difference(tensors, recorded)
    if found is not None:
        key, what = found
        raise CheckpointError(f"{path}: tensor {key!r} " + {
            "missing": "is listed in its sha256 manifest but missing",
            "unrecorded": "is not in its sha256 manifest (added after writing?)",
            "changed": "does not match its recorded sha256 (the file was changed or corrupted after it was "
                       "written)"}[what])
    return True


def first_difference(tensors: dict[str, Any], recorded: dict[str, str]) -> Optional[tuple[str, str]]:
    """(key, "missing" | "unrecorded" | "changed") of the first key, in sorted order, where the
    tensors and the recorded sha256 disagree; None when they agree."""
    for key in sorted(set(recorded) | set(tensors)):
        if key not in tensors:
            return key, "missing"
        if key not in recorded:
            return key, "unrecorded"
        if tensor_sha256(tensors[key]) != recorded[key]:
            return key, "changed"
    return None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 24), b""):
            digest.update(piece)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def manifest_of(directory: str) -> dict[str, str]:
    return {rel: file_sha256(os.path.join(directory, rel)) for rel in _files(directory)}


def check_files(directory: str, ignore: tuple[str, ...] = ()) -> bool:
    """Check ``directory`` against its manifest.json: every listed file present with its sha256,
    no file added (``ignore``: names written after the manifest). False when there is none."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            recorded = json.load(fh)["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable manifest ({exc})") from None
    present = set(_files(directory)) - set(ignore)
    for rel in sorted(set(recorded) | present):
        full = os.path.join(directory, rel)
        if rel not in present:
            raise CheckpointError(f"{full}: listed in {MANIFEST_NAME} but missing")
        if rel not in recorded:
            raise CheckpointError(f"{full}: not listed in {MANIFEST_NAME} (added after the checkpoint was written)")
        if file_sha256(full) != recorded[rel]:
            raise CheckpointError(f"{full}: does not match its sha256 in {MANIFEST_NAME} (changed or corrupted "
                                  "after it was written)")
    return True
