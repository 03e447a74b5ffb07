"""The embedded default: a tiny Llama built from a config, a byte-level tokenizer with a few
special tokens, and a structured synthetic data set shipped in the package. No downloads.

The model (2 layers, width 128, about 0.5 M parameters) is deterministic from the seed. Its
weights are drawn with initializer_range 0.1 rather than Llama's 0.02: at 0.02 a small random
model's logits stay near +-1 whatever the adapter does, so the loss could barely fall.

The data set (``data/builtin.jsonl``) is a reversal task in prompt/completion form, written with
the special tokens: ``<|bos|>abcde<|sep|>`` -> ``edcba<|eos|>`` (words of 3 to 8 letters a-j).
Only the completion carries loss; the format is learned in a few dozen steps, the reversal in a
few hundred, which the demo's exact-match evaluation shows. The tokenizer's chat template
renders ``messages`` in the same shape (user turn: ``<|bos|>...<|sep|>``, assistant turn:
``...<|eos|>``), so the same task written as conversations trains the same tokens.
"""

from __future__ import annotations

import os
import random

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>"]
DATA_FILE = os.path.join(os.path.dirname(__file__), "data", "builtin.jsonl")
ALPHABET = "abcdefghij"
WORD_LENGTHS = (3, 8)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<|eos|>"
                 "{% else %}<|bos|>{{ m['content'] }}<|sep|>{% endif %}{% endfor %}")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable unicode map: 256 symbols, one per byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(keep, chars))]


def builtin_tokenizer():
    """A transformers fast tokenizer: one token per byte (no merges) plus SPECIAL_TOKENS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", additional_special_tokens=["<|sep|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


BUILTIN_MODELS = ("llama", "moe")


def builtin_model(seed: int, tokenizer, dtype: torch.dtype = torch.float32, kind: str = "llama"):
    """``kind``: "llama" (dense), or "moe": a Qwen3-MoE of the same size, 8 experts, top-2, whose
    experts transformers stores as 3-D parameters (LoRA on them: ``LoraConfig.target_parameters``)."""
    import transformers

    shared = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                  tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
    if kind == "moe":
        cfg = transformers.Qwen3MoeConfig(**shared, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                          head_dim=32)
        cls, name = transformers.Qwen3MoeForCausalLM, "dist_adapters/builtin-tiny-moe"
    else:
        cfg = transformers.LlamaConfig(**shared)
        cls, name = transformers.LlamaForCausalLM, "dist_adapters/builtin-tiny-llama"
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    model.config.name_or_path = name
    return model


def make_builtin_dataset(path: str = DATA_FILE, n: int = 4096, seed: int = 1234) -> None:
    """Regenerate the shipped data file (deterministic). Run: python -m dist_adapters.recipe.builtin"""
    import json

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(*WORD_LENGTHS)))
            fh.write(json.dumps({"prompt": f"<|bos|>{word}<|sep|>", "completion": f"{word[::-1]}<|eos|>"}) + "\n")


if __name__ == "__main__":
    make_builtin_dataset()
    print(f"wrote {DATA_FILE}")
