"""Tiny models built from configs (no downloads) and comparison helpers shared by the tests."""

from __future__ import annotations

import contextlib

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128

# Tolerances shared by the suite: each about ten times the largest difference measured for it
# (on Intel and AMD EPYC CPUs, fp32), so that a real defect, far larger, cannot pass.
LOGITS_TOL = 3e-6   # one model through two code paths (engine vs plain, peft vs ours, reload): logits
#                     of size 1-10; measured 0 to 3.2e-7
WEIGHTS_TOL = 3e-7  # weights written back through an engine or restored by unmerge (size ~0.1-1);
#                     measured 0 to 3e-8


def tiny_llama(seed: int = 0, tie: bool = False, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, attn_implementation="eager", **config)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def input_ids(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


@torch.no_grad()
def logits(model, ids=None) -> torch.Tensor:
    model.eval()
    return model(input_ids=input_ids() if ids is None else ids).logits


@torch.no_grad()
def randomize_trainable(model, seed: int = 123, scale: float = 0.05) -> None:
    """Give every trainable tensor non-zero values so that a lost or misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * scale + p)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def expected_merged(plain, token_ids=()) -> dict[str, torch.Tensor]:
    """What merging ``plain``'s active "default" adapter must leave in its frozen weights, computed
    here from its factors: W + scaling * B @ A for every LoRA layer (in the base weight's layout),
    and the trainable token rows written over their embedding rows."""
    out = {n: p.detach().clone() for n, p in plain.named_parameters() if not p.requires_grad}
    for name, m in plain.named_modules():
        if hasattr(m, "lora_A"):  # Linear [out, in]; transformers' Conv1D stores [in, out]
            a, b = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
            delta = m.scaling["default"] * (b @ a)
            out[f"{name}.base_layer.weight"] += delta.T if m.fan_in_fan_out else delta
        elif hasattr(m, "lora_embedding_A"):  # A [r, V], B [d, r]; the embedding is [V, d]
            a, b = m.lora_embedding_A["default"].weight.detach(), m.lora_embedding_B["default"].weight.detach()
            out[f"{name}.base_layer.weight"] += m.scaling["default"] * (b @ a).T
        elif hasattr(m, "trainable_tokens_delta"):
            out[f"{name}.base_layer.weight"][list(token_ids)] = m.trainable_tokens_delta["default"].weight.detach()
    return out


def merged_flags(model) -> list[str]:
    """The distinct ``merged_adapters`` lists of the model's LoRA and trainable-token layers."""
    kinds = ("lora_A", "lora_embedding_A", "trainable_tokens_delta")
    return sorted({str(m.merged_adapters) for m in model.modules() if any(hasattr(m, k) for k in kinds)})


def leave_process_group() -> None:
    """The end of a tests/dist script: every rank leaves together, then the process exits at once.
    Interpreter finalization can destroy a gloo process group still referenced elsewhere (a device
    mesh) while its worker threads run, and abort a script that finished its work ("terminate
    called without an active exception", exit -6; seen once in about a hundred launches here)."""
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def counting_fused_calls():
    """A list that gets one entry per call of the fused LoRA Linear (layers/fused.py) inside the
    block (eager calls; under torch.compile the function is traced, not called)."""
    import dist_adapters.layers.lora as lora_module

    real = lora_module.FusedLoraLinear
    calls: list[int] = []

    class Counting(real):
        @classmethod
        def apply(cls, *args):
            calls.append(1)
            return real.apply(*args)

    lora_module.FusedLoraLinear = Counting
    try:
        yield calls
    finally:
        lora_module.FusedLoraLinear = real
