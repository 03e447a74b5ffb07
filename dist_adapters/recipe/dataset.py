"""The run's data from the ``data`` section: records read (recipe/sources.py), rendered and
masked (recipe/formats.py), tokenized, packed when asked, and split off for evaluation.

``data.eval_fraction`` holds out a fixed share of the records, chosen by a permutation with a
fixed seed (the same held-out set whatever ``train.seed``); ``data.eval_path`` reads a second file
of the same format. The evaluation set is never packed: each sample is one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import builtin
from .config import RecipeError
from .data import TokenizedData
from .formats import default_train_on, detect_format, render, tokenize
from .packing import PackedData
from .sources import Record, read_records

EVAL_SPLIT_SEED = 20_261_201


@dataclass
class RunData:
    train: Union[TokenizedData, PackedData]
    eval: Optional[TokenizedData]
    fmt: str
    train_on: str
    where: str
    pad_note: str = ""

    def summary(self) -> str:
        line = self.train.summary(self.where) + f"; format {self.fmt}, loss on {self.train_on} tokens"
        if self.eval is not None:
            line += f"; {len(self.eval)} evaluation samples"
        return line + self.pad_note


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def load_run_data(cfg: dict, tokenizer) -> RunData:
    section = cfg["data"]
    path = section["path"] or builtin.DATA_FILE
    records = read_records(path)
    eval_records = read_records(section["eval_path"], "data.eval_path") if section["eval_path"] else None
    if section["eval_fraction"]:
        records, eval_records = _split(records, section["eval_fraction"], path)
    fmt = section["format"] if section["format"] != "auto" else detect_format(records[0])
    train_on = section["train_on"] or default_train_on(fmt)
    if fmt == "text" and train_on == "completion":
        raise RecipeError(f"data.train_on: completion needs prompt/completion or messages data; {path} is text "
                          "(every token carries loss): use data.train_on: all")
    if train_on == "completion" and not getattr(tokenizer, "is_fast", False):
        raise RecipeError("data.train_on: completion needs a fast tokenizer (character offsets); the tokenizer of "
                          "model.path is a slow one: set model.tokenizer_path or data.train_on: all")
    if cfg.get("train", {}).get("eval_generate") and fmt == "text":
        raise RecipeError(f"train.eval_generate needs prompts: {path} is text data (use prompt/completion or "
                          "messages records, or train.eval_generate: 0)")
    seq_len, pad = section["seq_len"], pad_id(tokenizer)
    train = TokenizedData(_samples(records, fmt, tokenizer, train_on), seq_len, pad)
    if len(train.no_target) == len(train):
        raise RecipeError(f"{path}: no sample has a loss-carrying token after its first: there is nothing to learn")
    evaluation = None
    if eval_records is not None:
        evaluation = TokenizedData(_samples(eval_records, fmt, tokenizer, train_on), seq_len, pad)
    where = section["path"] or "the built-in data set"
    note = "" if tokenizer.pad_token_id is not None else (
        f"; the tokenizer has no pad token: padding with EOS (id {pad}), which carries no loss there")
    return RunData(PackedData(train) if section["packing"] else train, evaluation, fmt, train_on, where, note)


def load_data(tokenizer, **data_keys) -> RunData:
    """``load_run_data`` for use outside the recipe: ``data_keys`` are the recipe's ``data``
    section keys (path, seq_len, format, train_on, packing, eval_path, eval_fraction), with the
    recipe's defaults for the rest. E.g. ``load_data(tok, path="chat.jsonl", seq_len=512).train``."""
    from .config import DEFAULTS

    unknown = sorted(set(data_keys) - set(DEFAULTS["data"]))
    if unknown:
        raise TypeError(f"load_data: unknown data keys {unknown} (keys: {', '.join(DEFAULTS['data'])})")
    return load_run_data({"data": {**DEFAULTS["data"], **data_keys}}, tokenizer)


def _samples(records: list[Record], fmt: str, tokenizer, train_on: str):
    return [tokenize(render(record, fmt, tokenizer), tokenizer, train_on) for record in records]


def _split(records: list[Record], fraction: float, path: str) -> tuple[list[Record], list[Record]]:
    held = round(len(records) * fraction)
    if held < 1 or held >= len(records):
        raise RecipeError(f"data.eval_fraction {fraction} of {len(records)} samples in {path} leaves "
                          f"{held} for evaluation and {len(records) - held} for training: both need at least one")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(EVAL_SPLIT_SEED)).tolist()
    evaluation = set(order[:held])
    return ([r for i, r in enumerate(records) if i not in evaluation],
            [r for i, r in enumerate(records) if i in evaluation])
