"""Data files as records: JSONL, JSON, Parquet, or a directory written by ``datasets.save_to_disk``.

Every record is a dict with a ``where`` string (``file:line`` for JSONL, ``file: record N``
otherwise) so that an error about a sample names it. Parquet needs pyarrow and a datasets
directory needs ``datasets`` (pip install datasets): neither is needed for JSONL.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .config import RecipeError


@dataclass(frozen=True)
class Record:
    where: str   # "file:line" or "file: record N", for messages
    value: dict


def read_records(path: str, key: str = "data.path") -> list[Record]:
    """The records of ``path`` (``key``: the recipe key that named it, for errors)."""
    if os.path.isdir(path):
        records = _read_datasets_dir(path, key)
    elif not os.path.exists(path):
        raise RecipeError(f"{key} {path!r}: no such file or directory")
    elif path.endswith(".parquet"):
        records = _read_parquet(path)
    elif path.endswith(".json"):
        records = _read_json(path)
    else:
        records = _read_jsonl(path)
    if not records:
        raise RecipeError(f"{path}: no samples")
    return records


def _read_jsonl(path: str) -> list[Record]:
    records: list[Record] = []
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
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise RecipeError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            records.append(Record(f"{path}:{number}", value))
    return records


def _read_json(path: str) -> list[Record]:
    """A JSON array of objects (or an object whose one list value is that array)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise RecipeError(f"{path}: expected a JSON array of objects (or an object holding one array)")
        value = lists[0]
    if not isinstance(value, list):
        raise RecipeError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    return [_object(path, i, v) for i, v in enumerate(value)]


def _object(path: str, index: int, value) -> Record:
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: record {index + 1}: expected an object, got {type(value).__name__}")
    return Record(f"{path}: record {index + 1}", value)


def _read_parquet(path: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RecipeError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or datasets)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError family
        raise RecipeError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None
    return [_object(path, i, row) for i, row in enumerate(rows)]


def _read_datasets_dir(path: str, key: str) -> list[Record]:
    if not os.path.isfile(os.path.join(path, "dataset_info.json")) and not os.path.isfile(
            os.path.join(path, "dataset_dict.json")):
        raise RecipeError(f"{key} {path!r} is a directory but not one written by datasets' save_to_disk "
                          "(no dataset_info.json)")
    try:
        import datasets
    except ImportError:
        raise RecipeError(f"{key} {path!r}: a datasets directory needs the datasets package "
                          "(pip install datasets)") from None
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise RecipeError(f"{key} {path!r}: a DatasetDict without a 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    return [_object(path, i, row) for i, row in enumerate(loaded)]
