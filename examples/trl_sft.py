"""TRL's SFTTrainer on a model with dist_adapters' LoRA, prompt/completion data, loss on the
completions: every checkpoint-N/ holds a PEFT adapter/ and no copy of the frozen base.

    python examples/trl_sft.py --out runs/trl_sft
    torchrun --standalone --nproc_per_node 2 examples/trl_sft.py --out runs/trl_sft

The one change to a TRL script is the model (``da.inject(...)``) and the callback. Resume with
``--resume runs/trl_sft/checkpoint-10``; load a checkpoint's adapter with peft:
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("runs/trl_sft/base_model"),
"runs/trl_sft/checkpoint-10/adapter")``. TRL is not a dependency of dist_adapters.
"""

import argparse
import os

import datasets
import torch
from trl import SFTConfig, SFTTrainer

import dist_adapters as da
from dist_adapters.integrations.transformers import AdapterCheckpointCallback
from dist_adapters.recipe.builtin import DATA_FILE, builtin_model, builtin_tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/trl_sft")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--save-steps", type=int, default=10)
ap.add_argument("--resume", default=None)
args = ap.parse_args()

tokenizer = builtin_tokenizer()
model = builtin_model(seed=0, tokenizer=tokenizer)  # or AutoModelForCausalLM.from_pretrained(...)
base_dir = os.path.join(args.out, "base_model")
if int(os.environ.get("RANK", "0")) == 0:
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
torch.manual_seed(0)
config = da.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", base_model_name_or_path=base_dir)

trainer = SFTTrainer(
    model=da.inject(model, config),
    args=SFTConfig(output_dir=args.out, max_steps=args.steps, save_steps=args.save_steps, learning_rate=4e-3,
                   per_device_train_batch_size=8, max_length=24, logging_steps=5, report_to=[], seed=0,
                   use_cpu=not torch.cuda.is_available()),
    train_dataset=datasets.load_dataset("json", data_files=DATA_FILE, split="train"),  # {"prompt", "completion"}
    processing_class=tokenizer,
    callbacks=[AdapterCheckpointCallback()],
)
trainer.train(resume_from_checkpoint=args.resume)
if trainer.is_world_process_zero():
    print(f"checkpoints with a PEFT adapter/: {sorted(d for d in os.listdir(args.out) if d.startswith('checkpoint-'))}")
