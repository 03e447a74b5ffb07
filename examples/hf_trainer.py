"""transformers' Trainer on a model with dist_adapters' LoRA + trainable tokens, sharded by
accelerate with either config in configs/:

    accelerate launch --config_file configs/accelerate_deepspeed.yaml examples/hf_trainer.py --out runs/hf
    accelerate launch --config_file configs/accelerate_fsdp.yaml examples/hf_trainer.py --out runs/hf

The Trainer and accelerate do the sharding and the loop; dist_adapters supplies the adapter
layers (injected before the Trainer wraps the model), AdapterCheckpointCallback (every
checkpoint-N/ holds a PEFT adapter/ and no copy of the frozen base; resume_from_checkpoint works
from it) and the collective PEFT save at the end.
DeepSpeed (ZeRO-3) runs on CPU too. accelerate (1.15) turns its FSDP config on only for
accelerator devices (CUDA, XPU, NPU...): on a CPU-only machine the FSDP command runs the Trainer
under DDP (MULTI_CPU), which the script reports; for sharded CPU runs use `dist-adapters train`.
"""

import argparse
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
from transformers import Trainer, TrainingArguments

import dist_adapters as da
from dist_adapters.integrations.transformers import AdapterCheckpointCallback
from dist_adapters.recipe.builtin import builtin_model, builtin_tokenizer
from dist_adapters.recipe.dataset import load_data

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/hf_trainer")
ap.add_argument("--steps", type=int, default=10)
args = ap.parse_args()

tokenizer = builtin_tokenizer()
model = builtin_model(seed=0, tokenizer=tokenizer)
base_dir = os.path.join(args.out, "base_model")
if int(os.environ.get("RANK", "0")) == 0:
    model.save_pretrained(base_dir)
torch.manual_seed(0)
da.inject(model, da.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                               trainable_token_indices=[256, 257, 259], base_model_name_or_path=base_dir))

# the built-in prompt/completion data, tokenized with the loss on the completions (the recipe's reader)
data = load_data(tokenizer, seq_len=32).train


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return len(data)

    def __getitem__(self, i):
        b = data.batch([i])
        return {"input_ids": b.input_ids[0], "attention_mask": b.attention_mask[0], "labels": b.labels[0]}


trainer = Trainer(model=model, train_dataset=Samples(), args=TrainingArguments(
    output_dir=args.out, per_device_train_batch_size=4, max_steps=args.steps, learning_rate=1e-2,
    logging_steps=5, save_steps=5, report_to=[], use_cpu=not torch.cuda.is_available(), seed=0),
    callbacks=[AdapterCheckpointCallback()])
trainer.train()
# every rank calls; only adapter tensors are gathered; rank 0 writes the PEFT directory
da.save_adapter(trainer.model, os.path.join(args.out, "adapter"))
# FSDP2 shards into DTensors, ZeRO-3 partitions (ds_id); DDP leaves full tensors
sharded = any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in trainer.model.parameters())
if trainer.is_world_process_zero():
    kind = trainer.accelerator.state.distributed_type
    print(f"world size {trainer.args.world_size}, accelerate distributed type {kind.value}, "
          f"parameters sharded: {sharded}")
    print(f"adapter written to {os.path.join(args.out, 'adapter')}")
