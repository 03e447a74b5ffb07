"""Sample formats and the loss mask: ``{"text"}``, ``{"prompt", "completion"}`` and
``{"messages": [{"role", "content"}, ...]}`` (TRL's names).

Each record is rendered to one string plus the character spans that carry loss (the completion;
in a conversation, every assistant turn as the chat template writes it, end-of-turn tokens
included). The string is tokenized once with offsets, and a token carries loss when it holds at
least one character of such a span. So a tokenizer that merges the prompt's last characters with
the completion's first into one token still masks right: that token is a completion token (as
transformers' ``return_assistant_tokens_mask`` counts it), and nothing is re-tokenized piecewise.

A chat template's assistant spans come from rendering prefixes of the conversation: the text
added by turn i (rendered after the generation prompt of turns < i) is that turn's span. A
template whose rendering of a prefix is not a prefix of the whole is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import RecipeError
from .sources import Record


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character ranges that carry loss (train_on completion)
    prompt: Optional[str]               # what a generation starts from (None for plain text)
    reference: Optional[str]            # the expected completion, for exact match
    templated: bool                     # rendered by a chat template (which writes its own special tokens)


@dataclass(frozen=True)
class Sample:
    ids: list[int]
    labels: list[int]                   # the token where it carries loss, -100 elsewhere
    prompt_ids: Optional[list[int]]     # tokens of the prompt alone, for generation
    reference: Optional[str]


def detect_format(record: Record) -> str:
    value = record.value
    if "messages" in value:
        return "messages"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    if "text" in value:
        return "text"
    raise RecipeError(f'{record.where}: cannot tell the data format from the keys {sorted(value)[:8]} (expected '
                      '"text", "prompt" and "completion", or "messages"); or set data.format')


def default_train_on(fmt: str) -> str:
    return "all" if fmt == "text" else "completion"


def render(record: Record, fmt: str, tokenizer) -> Rendered:
    value = record.value
    if fmt == "text":
        text = _string(record, "text")
        return Rendered(text, ((0, len(text)),), None, None, False)
    if fmt == "prompt_completion":
        prompt, completion = value.get("prompt"), value.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt/completion
            return _render_messages(record, prompt + completion, tokenizer)
        prompt, completion = _string(record, "prompt"), _string(record, "completion")
        text = prompt + completion
        return Rendered(text, ((len(prompt), len(text)),), prompt, completion, False)
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecipeError(f'{record.where}: expected "messages" as a non-empty list of {{"role", "content"}} objects')
    return _render_messages(record, messages, tokenizer)


def _string(record: Record, key: str) -> str:
    value = record.value.get(key)
    if not isinstance(value, str):
        raise RecipeError(f'{record.where}: expected a string "{key}" field, got {type(value).__name__}')
    return value


def _render_messages(record: Record, messages: list, tokenizer) -> Rendered:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or \
                not isinstance(message.get("content"), str):
            raise RecipeError(f'{record.where}: messages[{i}] must be an object with string "role" and "content"')
    if getattr(tokenizer, "chat_template", None) is None:
        raise RecipeError(f"{record.where}: messages data needs a chat template, and the tokenizer has none "
                          "(set model.tokenizer_path to one that has, or convert the data to prompt/completion)")
    text = _apply(tokenizer, messages, False, record)
    spans, prompt = [], None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:i], True, record) if i else ""
        through = _apply(tokenizer, messages[:i + 1], False, record)
        if not through.startswith(before) or not text.startswith(through):
            raise RecipeError(f"{record.where}: the chat template does not render conversation prefixes as prefixes of "
                              f"the whole (at messages[{i}]): assistant turns cannot be located; use data.train_on: all")
        spans.append((len(before), len(through)))
        prompt = before
    if not spans:
        raise RecipeError(f"{record.where}: no assistant message: nothing carries loss (or set data.train_on: all)")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return Rendered(text, tuple(spans), prompt, messages[last]["content"], True)


def _apply(tokenizer, messages: list, generation_prompt: bool, record: Record) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template's own raise_exception, or a jinja error
        raise RecipeError(f"{record.where}: the chat template failed: {' '.join(str(exc).split())[:200]}") from None


def tokenize(rendered: Rendered, tokenizer, train_on: str) -> Sample:
    """Token ids and labels of one rendered sample (an EOS appended unless a template wrote it)."""
    add_special = not rendered.templated
    if train_on == "all":
        ids = tokenizer(rendered.text, add_special_tokens=add_special)["input_ids"]
        labels = list(ids)
    else:
        encoded = tokenizer(rendered.text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [tok if _carries_loss(start, end, rendered.spans) else -100
                  for tok, (start, end) in zip(ids, encoded["offset_mapping"])]
    eos = tokenizer.eos_token_id
    if not rendered.templated and eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
        labels = labels + [eos]  # the end of the completion (or of the text) is learned too
    prompt_ids = None
    if rendered.prompt is not None:
        prompt_ids = tokenizer(rendered.prompt, add_special_tokens=add_special)["input_ids"]
    return Sample(ids, labels, prompt_ids, rendered.reference)


def _carries_loss(start: int, end: int, spans) -> bool:
    return end > start and any(start < b and end > a for a, b in spans)
