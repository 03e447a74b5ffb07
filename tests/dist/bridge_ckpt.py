"""Megatron-Bridge LoRA checkpoints written by megatron-core itself, for tests/test_foreign_sources.py.

    torchrun --nproc-per-node 2 tests/dist/bridge_ckpt.py OUT

Megatron-Bridge needs Transformer Engine (CUDA) to install, so its LoRA is rebuilt here on
megatron-core's own layers as Bridge 0.3.1 builds it (``peft/utils.py`` ParallelLinearAdapter:
``linear_in`` / ``linear_out`` column/row-parallel as there, fc1's B through megatron's swiglu
sharded factory; ``peft/lora_layers.py`` LoRALinear: ``to_wrap`` + ``adapter``), and saved as
Bridge's ``save_checkpoint`` does: the model's ``sharded_state_dict`` filtered to ``.adapter.``
keys, ``dist_checkpointing.save`` (torch_dist), ``run_config.yaml`` (yaml.safe_dump, sorted,
``params_to_save`` a set) and the tracker file.

  OUT/tp2/   saved with tensor parallel 2 (both ranks hold shards of every adapter tensor)
  OUT/tp1/   the same adapter saved with tensor parallel 1 (two data-parallel replicas)
  OUT/base_model/, OUT/live_adapter.pt, OUT/live_logits.pt   the TP 1 model's base as an HF
  Llama, its adapter under peft keys (Bridge's own qkv split formula), and its logits

The adapter values are one seeded draw of the full tensors, each rank taking its slice as
megatron lays it out, so both saves hold the same adapter. On a CPU-only torch megatron-core
needs three shims: rotary's ``torch.cuda.current_device()``, the save's ``torch.cuda.synchronize()``
and the attention-dropout CUDA RNG fork (dropout is 0).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")  # "Transformer Engine and Apex are not installed"
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory  # noqa: E402

L, H, NH, NG, KV, FFN, V, R, ALPHA = 2, 32, 4, 2, 8, 48, 64, 4, 8
ITERATION = 10


class ParallelLinearAdapter(nn.Module):
    """Bridge's LoRA adapter (peft/utils.py): A column-parallel (gathered) for column-parallel
    bases, row-parallel for row-parallel ones; B column-parallel; output * alpha / dim."""

    def __init__(self, base, name: str, config) -> None:
        super().__init__()
        self.name, self.row = name, isinstance(base, RowParallelLinear)
        if self.row:
            self.linear_in = RowParallelLinear(base.input_size, R, config=config, input_is_parallel=True,
                                               skip_bias_add=True, bias=False, init_method=nn.init.xavier_normal_)
        else:
            self.linear_in = ColumnParallelLinear(base.input_size, R, config=config, bias=False, gather_output=True,
                                                  init_method=nn.init.xavier_normal_)
        self.linear_out = ColumnParallelLinear(R, base.output_size, config=config, bias=False, gather_output=self.row,
                                               init_method=nn.init.zeros_)

    def forward(self, x):
        x, _ = self.linear_in(x)
        x, _ = self.linear_out(x)
        return x * (ALPHA / R)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = self.linear_in.sharded_state_dict(f"{prefix}linear_in.", sharded_offsets, metadata)
        out = self.linear_out.sharded_state_dict(f"{prefix}linear_out.", sharded_offsets, metadata)
        if "linear_fc1" in self.name:
            key = f"{prefix}linear_out.weight"
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
        sd.update(out)
        return sd


class LoRALinear(nn.Module):
    def __init__(self, to_wrap, adapter) -> None:
        super().__init__()
        self.to_wrap, self.adapter = to_wrap, adapter

    def forward(self, x, *args, **kwargs):
        out, bias = self.to_wrap(x, *args, **kwargs)
        return out + self.adapter(x.contiguous()).reshape(out.shape), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = dict(self.to_wrap.sharded_state_dict(prefix, sharded_offsets, metadata))
        sd.update(self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets, metadata))
        return sd


def build(tp: int):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        num_layers=L, hidden_size=H, num_attention_heads=NH, num_query_groups=NG, kv_channels=KV, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-6,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, use_cpu_initialization=True,
        params_dtype=torch.float32, tensor_model_parallel_size=tp)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=V, max_sequence_length=64, position_embedding_type="rope", rotary_base=10000,
                     share_embeddings_and_output_weights=False)
    with torch.no_grad():  # norms are ones at init: other values show a misplaced norm in the HF copy
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    for p in model.parameters():  # PEFT.freeze_model
        p.requires_grad_(False)
    for i, layer in enumerate(model.decoder.layers):
        for parent_name, parent in (("self_attention", layer.self_attention), ("mlp", layer.mlp)):
            for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
                base = getattr(parent, name, None)
                if base is not None:
                    adapter = ParallelLinearAdapter(base, f"decoder.layers.{i}.{parent_name}.{name}", cfg)
                    setattr(parent, name, LoRALinear(base, adapter))
    set_adapter(model, tp)
    return model


def set_adapter(model, tp: int) -> None:
    """One seeded draw of each full tensor; this rank's slice as megatron lays it out (fc1's B is
    [gate_r; up_r] per rank)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for index, (n, p) in enumerate(sorted((n, p) for n, p in model.named_parameters() if ".adapter." in n)):
            dim = p.partition_dim
            shape = list(p.shape)
            shape[dim] *= tp
            full = 0.2 * torch.randn(shape, generator=torch.Generator().manual_seed(100 + index))
            if "linear_fc1.adapter.linear_out" in n:
                gate, up = full.chunk(2, 0)
                p.copy_(torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]]))
            else:
                p.copy_(full.chunk(tp, dim)[rank])
            p.requires_grad_(True)


def save_bridge(model, out: str) -> None:
    import yaml

    meta = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    params_to_save = {n for n, p in model.named_parameters() if p.requires_grad}
    keep = lambda k: k in params_to_save or ".adapter." in k or k.endswith(".adapters")  # noqa: E731
    state = {"checkpoint_version": 3.0, "iteration": ITERATION,
             "model": {k: v for k, v in model.sharded_state_dict(metadata=meta).items() if keep(k)}}
    ckpt = os.path.join(out, f"iter_{ITERATION:07d}")
    if dist.get_rank() == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, ckpt, get_default_save_sharded_strategy("torch_dist"),
                            content_metadata={k: v for k, v in meta.items() if k != "dp_cp_group"})
    if dist.get_rank() == 0:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        config = {"_target_": "megatron.bridge.training.config.ConfigContainer",
                  "checkpoint": {"ckpt_format": "torch_dist", "save": out, "save_optim": False},
                  "model": {"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", "num_layers": L,
                            "hidden_size": H, "num_attention_heads": NH, "num_query_groups": NG, "kv_channels": KV,
                            "ffn_hidden_size": FFN, "gated_linear_unit": True, "normalization": "RMSNorm",
                            "tensor_model_parallel_size": tp, "vocab_size": V},
                  "peft": {"_target_": "megatron.bridge.peft.lora.LoRA", "dim": R, "alpha": ALPHA, "dropout": 0.0,
                           "dropout_position": "pre", "exclude_modules": [], "params_to_save": params_to_save,
                           "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}}
        with open(os.path.join(ckpt, "run_config.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh, default_flow_style=False)
        with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w", encoding="utf-8") as fh:
            fh.write(str(ITERATION))
    dist.barrier()


def hf_base_and_adapter(model):
    """The TP 1 model's base as HF Llama weights, and its adapter under peft keys (Bridge's
    split_qkv_weights: rows per query group [q heads..., k, v]; fc1 [gate; up])."""
    sd = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    base = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
            "lm_head.weight": sd["output_layer.weight"], "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    adapter, per = {}, NH // NG

    def qkv(t):
        g = t.reshape(NG, per + 2, KV, t.shape[-1])
        return [g[:, :per].reshape(-1, t.shape[-1]), g[:, per].reshape(-1, t.shape[-1]),
                g[:, per + 1].reshape(-1, t.shape[-1])]

    for i in range(L):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        for proj, part in zip("qkv", qkv(sd[p + "self_attention.linear_qkv.to_wrap.weight"])):
            base[f"{q}self_attn.{proj}_proj.weight"] = part
        base[q + "self_attn.o_proj.weight"] = sd[p + "self_attention.linear_proj.to_wrap.weight"]
        base[q + "mlp.gate_proj.weight"], base[q + "mlp.up_proj.weight"] = \
            sd[p + "mlp.linear_fc1.to_wrap.weight"].chunk(2, 0)
        base[q + "mlp.down_proj.weight"] = sd[p + "mlp.linear_fc2.to_wrap.weight"]
        base[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        base[q + "post_attention_layernorm.weight"] = sd[p + "pre_mlp_layernorm.weight"]
        ad = lambda t, f: sd[f"{p}{t}.adapter.{f}.weight"].clone()  # noqa: E731
        pre = f"base_model.model.{q}"
        for proj, part in zip("qkv", qkv(ad("self_attention.linear_qkv", "linear_out"))):
            adapter[f"{pre}self_attn.{proj}_proj.lora_A.weight"] = ad("self_attention.linear_qkv", "linear_in")
            adapter[f"{pre}self_attn.{proj}_proj.lora_B.weight"] = part.contiguous()
        adapter[f"{pre}self_attn.o_proj.lora_A.weight"] = ad("self_attention.linear_proj", "linear_in")
        adapter[f"{pre}self_attn.o_proj.lora_B.weight"] = ad("self_attention.linear_proj", "linear_out")
        for proj, part in zip(("gate_proj", "up_proj"), ad("mlp.linear_fc1", "linear_out").chunk(2, 0)):
            adapter[f"{pre}mlp.{proj}.lora_A.weight"] = ad("mlp.linear_fc1", "linear_in")
            adapter[f"{pre}mlp.{proj}.lora_B.weight"] = part.contiguous()
        adapter[f"{pre}mlp.down_proj.lora_A.weight"] = ad("mlp.linear_fc2", "linear_in")
        adapter[f"{pre}mlp.down_proj.lora_B.weight"] = ad("mlp.linear_fc2", "linear_out")
    return base, adapter


def main(out: str) -> None:
    torch.cuda.current_device = lambda: "cpu"  # rotary moves inv_freq there (rotary_pos_embedding.py)
    torch.cuda.synchronize = lambda *a, **k: None  # the torch_dist writer's preload
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(world)
    save_bridge(build(world), os.path.join(out, f"tp{world}"))
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(1)  # the same adapter at TP 1, world-size data replicas
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    model = build(1).eval()
    save_bridge(model, os.path.join(out, "tp1"))
    if dist.get_rank() == 0:
        from transformers import LlamaConfig, LlamaForCausalLM

        base, adapter = hf_base_and_adapter(model)
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=NH,
            num_key_value_heads=NG, head_dim=KV, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
            tie_word_embeddings=False, attention_bias=False, mlp_bias=False))
        hf.load_state_dict(base, strict=True)
        hf.save_pretrained(os.path.join(out, "base_model"))
        torch.save(adapter, os.path.join(out, "live_adapter.pt"))
        ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
        mask = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
        with torch.no_grad():
            logits = model(ids, torch.arange(12).expand(2, 12), attention_mask=mask)
        torch.save({"input_ids": ids, "logits": logits}, os.path.join(out, "live_logits.pt"))
        print("bridge checkpoints written")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # the torch_dist writer starts a spawned helper process
    main(sys.argv[1])
