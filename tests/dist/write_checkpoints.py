"""Run under torchrun (2 ranks): train a tiny model with an adapter a couple of steps under a
plain engine and save the engine's own sharded checkpoint, the way a user who never heard of
dist_adapters would. Used by tests/test_consolidate.py and benchmarks/consolidate.py.

    write_checkpoints.py KIND ADAPTER OUT [--stage S] [--hidden H --inter I --layers L] [+ KIND ADAPTER OUT ...]

Jobs separated by "+" run one after another in the same process group (one start-up for many).

KIND: zero (deepspeed.initialize + save_checkpoint), dcp (FSDP2 + torch.distributed.checkpoint),
accelerate (accelerate's save_fsdp_model: OUT/ckpt/pytorch_model_fsdp_0/, keys under "model."),
fsdp1-dcp / fsdp1-ranks / fsdp1-local (FSDP1 with use_orig_params, saved by accelerate's
save_fsdp_model as SHARDED_STATE_DICT through DCP, SHARDED_STATE_DICT per-rank torch.save files
(use_dcp=False), or LOCAL_STATE_DICT per-rank files).
ADAPTER: ours (dist_adapters.inject) or peft (peft.get_peft_model).

Writes OUT/base_model (HF save_pretrained, before the adapter), OUT/ckpt (the checkpoint),
OUT/logits.pt (the trained model's logits on helpers.input_ids()) and OUT/adapter_config.json
(the adapter's PEFT config, as `save_pretrained` would write it next to a checkpoint).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from helpers import input_ids, leave_process_group  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("kind", choices=["zero", "dcp", "accelerate", "fsdp1-dcp", "fsdp1-ranks", "fsdp1-local"])
parser.add_argument("adapter", choices=["ours", "peft"])
parser.add_argument("out")
parser.add_argument("--stage", type=int, default=3)
parser.add_argument("--hidden", type=int, default=36)   # odd numels: r=3 x 45 exercises ZeRO padding
parser.add_argument("--inter", type=int, default=45)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--vocab", type=int, default=128)
parser.add_argument("--lora-rank", type=int, default=3)
parser.add_argument("--tokens", action="store_true", help="trainable tokens too (ours only)")
parser.add_argument("--steps", type=int, default=2)


def write(args: argparse.Namespace, rank: int) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=3, num_key_value_heads=1,
                      max_position_embeddings=64, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    if rank == 0:
        model.save_pretrained(os.path.join(args.out, "base_model"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if args.adapter == "ours":
        import dist_adapters as da

        config = da.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=targets, init_lora_weights=False,
                               rank_pattern={"down_proj": args.lora_rank + 1},
                               trainable_token_indices=[3, 5, 100] if args.tokens else None)
        da.inject(model, config)
        peft_config = config.to_dict() | {"base_model_name_or_path": os.path.join(args.out, "base_model")}
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=targets, init_lora_weights=False,
                            rank_pattern={"down_proj": args.lora_rank + 1},
                            base_model_name_or_path=os.path.join(args.out, "base_model"))
        model = get_peft_model(model, config)
        peft_config = config.to_dict()
    ids = input_ids()
    ckpt = os.path.join(args.out, "ckpt")

    if args.kind == "zero":
        import deepspeed

        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": args.stage}}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        for _ in range(args.steps):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=ids).logits
        engine.save_checkpoint(ckpt, tag=f"global_step{args.steps}")
    else:
        layers = (model.base_model.model if args.adapter == "peft" else model).model.layers
        if args.kind.startswith("fsdp1"):
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({type(layers[0])}),
                                             device_id=torch.device("cpu"), use_orig_params=True)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in layers:
                fully_shard(layer)
            fully_shard(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(args.steps):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if args.kind == "dcp":
            import torch.distributed.checkpoint as dcp

            dcp.save(model.state_dict(), checkpoint_id=ckpt)
        else:
            from accelerate import PartialState
            from accelerate.utils import FullyShardedDataParallelPlugin
            from accelerate.utils.fsdp_utils import save_fsdp_model
            from torch.distributed.fsdp import StateDictType

            version = 1 if args.kind.startswith("fsdp1") else 2
            kind = StateDictType.LOCAL_STATE_DICT if args.kind == "fsdp1-local" else StateDictType.SHARDED_STATE_DICT
            plugin = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type=kind)
            accel = PartialState(cpu=not torch.cuda.is_available())  # accelerate over the group torchrun started
            save_fsdp_model(plugin, accel, model, ckpt, use_dcp=args.kind != "fsdp1-ranks")
        if args.kind.startswith("fsdp1"):  # the live model's full adapter: the reference for the per-rank files
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType

            full = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)  # offload fails on CPU (FIELD-NOTES)
            with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, full):
                reference = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
            if rank == 0:
                torch.save(reference, os.path.join(args.out, "reference.pt"))
    if rank == 0:
        torch.save(logits, os.path.join(args.out, "logits.pt"))
        with open(os.path.join(args.out, "adapter_config.json"), "w", encoding="utf-8") as fh:
            json.dump(peft_config, fh, indent=2, default=list)


def jobs(argv: list[str]) -> list[argparse.Namespace]:
    """The command line's jobs, separated by "+", each parsed on its own."""
    groups, current = [], []
    for arg in argv:
        if arg == "+":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    return [parser.parse_args(group) for group in [*groups, current]]


if __name__ == "__main__":
    todo = jobs(sys.argv[1:])
    dist.init_process_group("gloo")
    for job in todo:
        write(job, dist.get_rank())
    leave_process_group()
