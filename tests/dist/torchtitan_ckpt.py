"""A real torchtitan (0.3.0) LoRA run and its own checkpoint, for tests/test_foreign_sources.py.

    python tests/dist/torchtitan_ckpt.py OUT

torchtitan's llama3 "debugmodel" (6 layers, dim 256, fused wqkv) converted by its LoRAConverter
(rank 4, alpha 8, every Linear incl. lm_head), two steps of its AdamW, then saved by its
CheckpointManager (interval save: model + optimizer + scheduler + train state) to
OUT/checkpoint/step-2/. Also written, by torchtitan's code or peft's, not ours:
  OUT/base_model/        the base as an HF LlamaForCausalLM (torchtitan's Llama3StateDictAdapter.to_hf)
  OUT/live_adapter.pt    the live LoRA factors under peft keys: the fused lora_b cut per kv group
                         as torchtitan's attention.py lays it out, q/k rows through the adapter's
                         own ``_permute``
  OUT/live_logits.pt     the live torchtitan model's logits on a probe batch
  OUT/lora_config.json   r, alpha and the HF target modules

Without triton (CPU machines), the one module that imports it on this path, the MoE
expert-parallel kernels (torchtitan/distributed/minimal_async_ep/kernels.py, unused by llama3),
is replaced by a module whose functions raise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

RANK, ALPHA = 4, 8.0


def _without_triton() -> None:
    if importlib.util.find_spec("triton") is not None:
        return
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    stub = types.ModuleType(name)

    def unavailable(*_a, **_k):
        raise RuntimeError("torchtitan's expert-parallel triton kernels are not available without triton")

    for fn in ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel", "expand_topk_grad_kernel",
               "fill_combine_metadata_kernel", "fill_dispatch_metadata_kernel", "invert_flat_indices_kernel",
               "reduce_topk_slots_kernel", "topk_scores_grad_kernel"):
        setattr(stub, fn, unavailable)
    sys.modules[name] = stub


_without_triton()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchtitan.components.checkpoint import CheckpointManager  # noqa: E402
from torchtitan.components.lora import LoRAConverter  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402


def build():
    spec = model_registry("debugmodel", converters=[LoRAConverter.Config(rank=RANK, alpha=ALPHA)])
    cfg = spec.model
    for layer in cfg.layers:  # plain causal SDPA instead of flex (compiles); holds no parameters
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return spec, cfg, model


def hf_config(cfg):
    from transformers import LlamaConfig

    attn, rope = cfg.layers[0].attention, cfg.layers[0].attention.rope
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.layers[0].feed_forward.w1.out_features,
        num_hidden_layers=len(cfg.layers), num_attention_heads=attn.n_heads,
        num_key_value_heads=attn.n_kv_heads or attn.n_heads, head_dim=attn.head_dim or cfg.dim // attn.n_heads,
        rms_norm_eps=cfg.norm.eps, max_position_embeddings=rope.max_seq_len, rope_theta=rope.theta,
        rope_scaling={"rope_type": "llama3", "factor": rope.scaling_factor, "low_freq_factor": rope.low_freq_factor,
                      "high_freq_factor": rope.high_freq_factor,
                      "original_max_position_embeddings": rope.original_max_position_embeddings},
        tie_word_embeddings=cfg.enable_weight_tying, attention_bias=False, mlp_bias=False, hidden_act="silu")


def live_peft_adapter(model, adapter, heads: int, kv: int, hd: int) -> dict:
    """The live factors under peft keys, by torchtitan's layouts (independent of our reader)."""
    names = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
    params = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    out = {}
    for key, a in params.items():
        if not key.endswith("lora_a.weight"):
            continue
        module = key[: -len(".lora_a.weight")]
        b = params[f"{module}.lora_b.weight"]
        if module == "lm_head":
            pairs = [("lm_head", b)]
        else:
            _, layer, rest = module.split(".", 2)
            pre = f"model.layers.{layer}."
            if rest == "attention.qkv_linear.wqkv":
                per = heads // kv
                g = b.view(kv, per + 2, hd, RANK)
                q, k, v = g[:, :per].reshape(-1, RANK), g[:, per].reshape(-1, RANK), g[:, per + 1].reshape(-1, RANK)
                pairs = [(pre + "self_attn.q_proj", adapter._permute(q, heads)),
                         (pre + "self_attn.k_proj", adapter._permute(k, kv, kv * hd, RANK)),
                         (pre + "self_attn.v_proj", v)]
            else:
                pairs = [(pre + names[rest], b)]
        for name, b_part in pairs:
            out[f"base_model.model.{name}.lora_A.weight"] = a.clone()
            out[f"base_model.model.{name}.lora_B.weight"] = b_part.contiguous().clone()
    return out


def main(out: str) -> None:
    from transformers import LlamaForCausalLM

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(out, "pg_store"), 1), rank=0, world_size=1)
    spec, cfg, model = build()
    optimizers = default_adamw(lr=1e-2).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=1, decay_ratio=None).build(optimizers=optimizers,
                                                                                     training_steps=10)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # lora_b starts at zero: two real steps make every factor matter
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
    checkpointer = CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, keep_latest_k=0).build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers, states={},
        sd_adapter=spec.state_dict_adapter(cfg, None), base_folder=out)
    checkpointer.save(curr_step=2)
    checkpointer.close()

    attn = cfg.layers[0].attention
    heads, kv = attn.n_heads, attn.n_kv_heads or attn.n_heads
    hd = attn.head_dim or cfg.dim // heads
    adapter = spec.state_dict_adapter(cfg, None)
    base = adapter.to_hf({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    hf = LlamaForCausalLM(hf_config(cfg))
    missing, unexpected = hf.load_state_dict(base, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    hf.save_pretrained(os.path.join(out, "base_model"))
    torch.save(live_peft_adapter(model, adapter, heads, kv, hd), os.path.join(out, "live_adapter.pt"))
    probe = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.save({"input_ids": probe, "logits": model(probe)}, os.path.join(out, "live_logits.pt"))
    with open(os.path.join(out, "lora_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"r": RANK, "lora_alpha": ALPHA}, fh)
    dist.destroy_process_group()
    print("torchtitan checkpoint written")


if __name__ == "__main__":
    main(sys.argv[1])
