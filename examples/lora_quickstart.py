"""Quickstart: LoRA on a tiny Llama built from a config, trained on a toy task, saved in the
PEFT format, loaded back, merged. Runs in seconds on a CPU; `make demo` runs it.

    python examples/lora_quickstart.py --output-dir runs/demo [--steps 30]

The toy task: each sequence counts up from a random start, (t + 1) mod V, which the random base
model cannot do and a rank-8 adapter learns within a few dozen steps.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dist_adapters as da

VOCAB = 64


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def counting_batch(gen: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    return (start + torch.arange(seq)) % VOCAB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = tiny_llama(args.seed)
    base_dir = os.path.join(args.output_dir, "base_model")
    model.save_pretrained(base_dir)  # so that peft / transformers can rebuild the same base

    config = da.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", base_model_name_or_path=base_dir)
    da.inject(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA injected: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.1f}%)")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(1, args.steps + 1):
        ids = counting_batch(gen, batch=16, seq=24)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    adapter_dir = os.path.join(args.output_dir, "adapter")
    da.save_adapter(model, adapter_dir)
    print(f"saved PEFT adapter: {adapter_dir} ({', '.join(sorted(os.listdir(adapter_dir)))})")

    model.eval()
    probe = counting_batch(torch.Generator().manual_seed(99), batch=4, seq=24)
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        reloaded = da.load_adapter(LlamaForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
        diff_reload = (reloaded(input_ids=probe).logits - trained).abs().max().item()
        merged = da.unload(reloaded, merge=True)
        diff_merge = (merged(input_ids=probe).logits - trained).abs().max().item()
        accuracy = (trained[:, :-1].argmax(-1) == probe[:, 1:]).float().mean().item()
    print(f"reloaded from disk: max |logit diff| = {diff_reload:.2e}; merged into plain Linear: {diff_merge:.2e}")
    print(f"next-token accuracy on the counting task: {100 * accuracy:.0f}%")
    print("load it with peft:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
          f"'{base_dir}'), '{adapter_dir}')")


if __name__ == "__main__":
    main()
