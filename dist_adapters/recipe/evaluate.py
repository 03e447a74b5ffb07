"""Evaluation during a recipe run: ``eval_loss`` over the held-out samples' loss-carrying tokens,
and greedy completions of the first ``train.eval_generate`` prompts with their exact match.

Both run on the engine's model as it trains (sharded or not), in eval mode and without
gradients. The loss is, like the training loss, the sum over every rank's samples divided by
the token count of the whole set, so it does not depend on the world size. Every rank runs the
same number of forwards (a rank whose share is empty runs a row without labels), because
FSDP and ZeRO-3 gather parameters inside the forward and a missing rank would hang the others.
Generation runs every prompt on every rank, one token per forward without a cache (the same
forward every engine trains with), and stops when all ranks agree that every row has ended.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .data import TokenizedData

MAX_NEW_TOKENS_SLACK = 2  # tokens past the longest reference completion before generation stops


def eval_loss(engine, data: TokenizedData, micro_batch_size: int, device) -> float:
    per_round = micro_batch_size * engine.dp_size
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(data), per_round):
        mine = list(range(start, min(start + per_round, len(data))))
        mine = mine[engine.dp_rank * micro_batch_size:(engine.dp_rank + 1) * micro_batch_size]
        batch = data.batch(mine or [0]).to(device)
        if not mine:
            batch.labels.fill_(-100)  # keeps this rank in step with the others' forwards
        logits = engine.model(**batch.model_inputs()).logits
        loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(),
                                    ignore_index=-100, reduction="sum").double()
        tokens += batch.target_tokens()
    both = torch.stack([loss_sum, tokens])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(both)
    return (both[0] / both[1]).item() if both[1] > 0 else float("nan")


def _stop_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    return ids


def greedy(engine, prompts: list[list[int]], max_new: int, stop: set[int], pad: int, device) -> list[list[int]]:
    """Greedy continuations (stop token excluded) of left-padded prompts, all ranks in step."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    stop_tensor = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    for _ in range(max_new):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].float().argmax(-1)
        ended = torch.isin(nxt, stop_tensor) if len(stop) else torch.zeros_like(done)
        for r in range(len(prompts)):
            if not done[r] and not ended[r]:
                out[r].append(int(nxt[r]))
        done |= ended
        ids = torch.cat([ids, torch.where(done, torch.full_like(nxt, pad), nxt)[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        all_done = done.all().to(torch.int32)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(all_done, op=torch.distributed.ReduceOp.MIN)
        if all_done.item():
            break
    return out


def _normal(tokenizer, text: str) -> str:
    """The text as the tokenizer decodes it, special tokens dropped, ends stripped."""
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip()


def generate_samples(engine, data: TokenizedData, count: int, tokenizer, micro_batch_size: int, device,
                     step: int) -> tuple[list[dict], Optional[float]]:
    """(one row per prompt, exact-match accuracy or None when no reference is known)."""
    from ..control import unwrap

    chosen = [s for s in data.samples if s.prompt_ids is not None][:count]
    references = [_normal(tokenizer, s.reference) if s.reference is not None else None for s in chosen]
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references if r), default=0)
    max_new = min(longest + MAX_NEW_TOKENS_SLACK, data.seq_len)
    stop = _stop_ids(tokenizer, unwrap(engine.model))
    pad = data.pad_id
    rows = []
    for start in range(0, len(chosen), micro_batch_size):
        part = chosen[start:start + micro_batch_size]
        outputs = greedy(engine, [s.prompt_ids for s in part], max_new, stop, pad, device)
        for sample, new, ref in zip(part, outputs, references[start:start + micro_batch_size]):
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            rows.append({"step": step, "prompt": tokenizer.decode(sample.prompt_ids), "completion": text,
                         "reference": ref, "exact_match": None if ref is None else text == ref})
    judged = [r["exact_match"] for r in rows if r["exact_match"] is not None]
    return rows, (sum(judged) / len(judged) if judged else None)


def evaluate(engine, data: TokenizedData, tokenizer, tr: dict, dist, step: int,
             samples_path: Optional[str]) -> dict:
    """Eval loss (and exact match) at ``step``; rank 0 appends the completions to samples.jsonl."""
    was_training = engine.model.training
    engine.model.eval()
    try:
        with torch.no_grad():
            result = {"eval_loss": eval_loss(engine, data, tr["micro_batch_size"], dist.device)}
            if tr["eval_generate"]:
                rows, accuracy = generate_samples(engine, data, tr["eval_generate"], tokenizer,
                                                  tr["micro_batch_size"], dist.device, step)
                if accuracy is not None:
                    result["eval_exact_match"] = accuracy
                if samples_path is not None:
                    with open(samples_path, "a", encoding="utf-8") as fh:
                        fh.writelines(json.dumps(row) + "\n" for row in rows)
    finally:
        engine.model.train(was_training)
    return result


def describe(result: dict, when: str) -> str:
    line = f"eval {when}: loss {result['eval_loss']:.4f}"
    if "eval_exact_match" in result:
        line += f", exact match {result['eval_exact_match']:.3f}"
    return line


def samples_file(out: str) -> str:
    return os.path.join(out, "samples.jsonl")
