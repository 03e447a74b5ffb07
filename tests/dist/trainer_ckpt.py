"""transformers' Trainer or TRL's SFTTrainer on the built-in model with our adapter and
AdapterCheckpointCallback, under whatever launcher started it (torchrun: DDP; accelerate with
configs/accelerate_deepspeed.yaml: ZeRO-3; configs/accelerate_fsdp.yaml: FSDP2).

    trainer_ckpt.py OUT [--trl | --peft] [--steps 6] [--save-steps 3] [--resume CHECKPOINT]

Writes OUT/base_model (rank 0, before injecting), the Trainer's OUT/checkpoint-N, and, after
training, OUT/live_logits.pt: a fixed probe batch and the live (sharded) model's logits on it,
computed by every rank (a ZeRO-3 forward gathers) and saved by rank 0.

``--peft``: a user who never heard of dist_adapters: peft's get_peft_model, no callback, the
Trainer's own checkpoints (a PEFT directory under DDP, DeepSpeed's global_stepN/ under ZeRO-3,
accelerate's pytorch_model_fsdp_0/ under FSDP); also OUT/live_adapter.pt, the live adapter
gathered from the engine under peft's file keys (the reference of tests/test_trainer_checkpoints.py).
"""

import argparse
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import dist_adapters as da
from dist_adapters.integrations.transformers import AdapterCheckpointCallback
from dist_adapters.recipe.builtin import DATA_FILE, builtin_model, builtin_tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--trl", action="store_true")
ap.add_argument("--peft", action="store_true")
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--save-steps", type=int, default=3)
ap.add_argument("--resume", default=None)
args = ap.parse_args()

tokenizer = builtin_tokenizer()
model = builtin_model(seed=0, tokenizer=tokenizer)
base_dir = os.path.join(args.out, "base_model")
if int(os.environ.get("RANK", "0")) == 0:
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
torch.manual_seed(0)
if args.peft:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             base_model_name_or_path=base_dir))
else:
    da.inject(model, da.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                   trainable_token_indices=[256, 257, 259], base_model_name_or_path=base_dir))
callbacks = [] if args.peft else [AdapterCheckpointCallback()]
common = dict(output_dir=args.out, per_device_train_batch_size=4, max_steps=args.steps, learning_rate=1e-2,
              save_steps=args.save_steps, save_strategy="steps", logging_steps=1, report_to=[], seed=0,
              use_cpu=not torch.cuda.is_available(), save_only_model=False)

if args.trl:
    import datasets
    from trl import SFTConfig, SFTTrainer

    records = datasets.load_dataset("json", data_files=DATA_FILE, split="train").select(range(256))
    # bf16=False: SFTConfig's default turns on bf16 autocast, which accelerate leaves patched into the
    # live model's forward, so its logits would not be the fp32 model's that peft reproduces
    trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=32, bf16=False), train_dataset=records,
                         processing_class=tokenizer, callbacks=callbacks)
else:
    from transformers import Trainer, TrainingArguments

    from dist_adapters.recipe.dataset import load_data

    data = load_data(tokenizer, seq_len=32).train

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 256

        def __getitem__(self, i):
            b = data.batch([i])
            return {"input_ids": b.input_ids[0], "attention_mask": b.attention_mask[0], "labels": b.labels[0]}

    trainer = Trainer(model=model, train_dataset=Samples(), args=TrainingArguments(**common),
                      callbacks=callbacks)

trainer.train(resume_from_checkpoint=args.resume)
probe = torch.tensor([tokenizer("<|bos|>abcdef<|sep|>fedcba<|eos|>")["input_ids"],
                      tokenizer("<|bos|>jihgfedcb<|sep|>abcd")["input_ids"]], device=trainer.args.device)
live = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
live.eval()
with torch.no_grad():
    logits = live(input_ids=probe).logits.float().cpu()
if args.peft:  # the live adapter, gathered from the engine (every rank enters)
    from peft import get_peft_model_state_dict

    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(lora.values())):
            full = {n.removeprefix("module."): p.detach().cpu().clone() for n, p in lora.items()}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        full = {n: t.detach().cpu().clone() for n, t in get_model_state_dict(trainer.model, options=options).items()}
    if trainer.is_world_process_zero():
        torch.save(get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model), state_dict=full),
                   os.path.join(args.out, "live_adapter.pt"))
if trainer.is_world_process_zero():
    torch.save({"input_ids": probe.cpu(), "logits": logits}, os.path.join(args.out, "live_logits.pt"))
    print(f"world size {trainer.args.world_size}, distributed type {trainer.accelerator.state.distributed_type.value}")
