"""Run under torchrun (2 ranks = TP 2, or 1 rank = TP 1): LoRA over Megatron-core column -> row
MLPs against the same math in plain torch on the gathered full weights; merge, collective save /
load, per-rank shard export. Writes its measurements to the JSON file argv[2] (rank 0) and the
files the test reads (full base weights, input, outputs, adapters) under argv[1].

Megatron on CPU: use_cpu_initialization=True; model_parallel_cuda_manual_seed needs CUDA, so the
default generator is seeded with torch.manual_seed (the same on every rank unless said otherwise).
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")  # Megatron's "Transformer Engine and Apex are not installed"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatron.core import ModelParallelConfig, parallel_state  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import dist_adapters as da  # noqa: E402
from dist_adapters.checkpoint.megatron_shards import read_megatron_shards, save_megatron_shards  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from helpers import leave_process_group  # noqa: E402

H, FFN, R, ALPHA = 16, 32, 4, 8
out_dir, result_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
parallel_state.initialize_model_parallel(world)
tp_group = parallel_state.get_tensor_model_parallel_group()
results = {}


def config(**kw):
    return ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                               params_dtype=torch.float32, **kw)


class MLP(nn.Module):
    """fc1 column-parallel, gelu, fc2 row-parallel. "parallel": fc1 keeps its output sharded and
    fc2 takes it as is (skip_bias_add on fc1); "gathered": fc1 gathers, fc2 scatters its input
    (skip_bias_add on fc2)."""

    def __init__(self, variant="parallel", cfg=None):
        super().__init__()
        cfg = cfg or config()
        gathered = variant == "gathered"
        init = lambda w: nn.init.normal_(w, std=0.2)  # noqa: E731
        self.fc1 = ColumnParallelLinear(H, FFN, config=cfg, init_method=init, bias=True, gather_output=gathered,
                                        skip_bias_add=not gathered)
        self.fc2 = RowParallelLinear(FFN, H, config=cfg, init_method=init, bias=True, input_is_parallel=not gathered,
                                     skip_bias_add=gathered)
        with torch.no_grad():  # Megatron zeroes biases; random ones (one full draw, sliced) show misplacement
            g = torch.Generator().manual_seed(7)
            self.fc1.bias.copy_(torch.randn(FFN, generator=g).chunk(world)[rank])
            self.fc2.bias.copy_(torch.randn(H, generator=g))

    def forward(self, x):
        h, b = self.fc1(x)
        h = F.gelu(h + b if b is not None else h)
        y, b = self.fc2(h)
        return y + b if b is not None else y


def build(variant="parallel", base_seed=0):
    torch.manual_seed(base_seed)  # Megatron's CPU init draws the FULL weight, then slices: any TP size agrees
    return MLP(variant)


def lora(model, seed=1, init=False):
    torch.manual_seed(seed)
    return da.inject(model, da.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=init))


# Which factors are sharded, and on which dim, written out here (not read from the layers):
# column-parallel fc1 shards lora_B by output rows, row-parallel fc2 shards lora_A by input columns.
SHARD_DIM = {"fc1.lora_B.default.weight": 0, "fc2.lora_A.default.weight": 1}


def local_slice(name, full):
    dim = SHARD_DIM.get(name)
    return full if dim is None or world == 1 else full.chunk(world, dim=dim)[rank].contiguous()


def all_gather_cat(t, dim):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def randomize(model, seed=123):
    """Non-zero full factors drawn here; each rank copies in its own slice. Returns the full
    factors, so the reference math below never depends on the library's gathers."""
    g = torch.Generator().manual_seed(seed)
    full = {}
    for n, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            shape = list(p.shape)
            if n in SHARD_DIM and world > 1:
                shape[SHARD_DIM[n]] *= world
            full[n] = torch.randn(shape, generator=g) * 0.1
            p.copy_(local_slice(n, full[n]))
    return full


def full_base(model):
    """Full base weights and biases: Megatron's partitioned ones all-gathered on Megatron's own
    partition dim (set by Megatron on its parameters), replicated ones as they are."""
    return {n: all_gather_cat(p, p.partition_dim) if getattr(p, "tensor_model_parallel", False) and world > 1
            else p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def full_grads(model):
    return {n: all_gather_cat(p.grad, SHARD_DIM[n]) if n in SHARD_DIM and world > 1 else p.grad.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def reference(w, x, scaling):
    """The same MLP in plain torch on full matrices; returns output, input grad, factor grads."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in w.items() if ".lora_" in k}
    x = x.clone().requires_grad_(True)

    def layer(inp, m):
        a, b = leaves[f"{m}.lora_A.default.weight"], leaves[f"{m}.lora_B.default.weight"]
        return inp @ w[f"{m}.base_layer.weight"].T + w[f"{m}.base_layer.bias"] + (inp @ a.T) @ b.T * scaling

    y = layer(F.gelu(layer(x, "fc1")), "fc2")
    (y * G).sum().backward()
    return y.detach(), x.grad, {k: v.grad for k, v in leaves.items()}


def worst(value: float) -> float:
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


gen = torch.Generator().manual_seed(3)
X = torch.randn(5, 3, H, generator=gen)  # Megatron's [sequence, batch, hidden]; the same on every rank
G = torch.randn(5, 3, H, generator=gen)  # loss = sum(y * G): a dense, fixed output gradient

# 1. forward, input grad, factor grads against full-matrix math, for both wirings
for variant in ("parallel", "gathered"):
    model = lora(build(variant))
    factors = randomize(model)
    x = X.clone().requires_grad_(True)
    y = model(x)
    (y * G).sum().backward()
    ref_y, ref_dx, ref_grads = reference({**full_base(model), **factors}, X, ALPHA / R)
    got = full_grads(model)
    results[f"{variant}_forward"] = worst((y - ref_y).abs().max().item())
    results[f"{variant}_input_grad"] = worst((x.grad - ref_dx).abs().max().item())
    # the factor gradients sum over all 15 tokens (|g| up to ~30): fp32 rounding shows at ~1e-6
    results[f"{variant}_factor_grads"] = worst(max((got[k] - v).abs().max().item() for k, v in ref_grads.items()))
    results[f"{variant}_output_scale"] = ref_y.abs().max().item()
    results[f"{variant}_factor_grad_count"] = len(got)
    results[f"{variant}_factor_grad_scale"] = max(v.abs().max().item() for v in ref_grads.values())
    # merge / unmerge: local per rank; the merged full weights are W + scaling * B @ A
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    full_w = full_base(model)
    target = {f"{m}.base_layer.weight": full_w[f"{m}.base_layer.weight"] + ALPHA / R * (
        factors[f"{m}.lora_B.default.weight"] @ factors[f"{m}.lora_A.default.weight"]) for m in ("fc1", "fc2")}
    with torch.no_grad():
        before = model(X)
        da.merge(model)
        merged = model(X)
        merged_w = full_base(model)
        results[f"{variant}_merged_flags"] = [list(model.fc1.merged_adapters), list(model.fc2.merged_adapters)]
        da.unmerge(model)
        after = model(X)
    results[f"{variant}_merge_delta"] = max((target[n] - full_w[n]).abs().max().item() for n in target)
    results[f"{variant}_merged_weights"] = worst(max((merged_w[n] - target[n]).abs().max().item() for n in target))
    results[f"{variant}_unmerged_flags"] = [list(model.fc1.merged_adapters), list(model.fc2.merged_adapters)]
    results[f"{variant}_merged_vs_unmerged"] = worst((merged - before).abs().max().item())
    results[f"{variant}_unmerge_weights"] = worst(max((p - base[n]).abs().max().item()
                                                      for n, p in model.named_parameters() if n in base))
    results[f"{variant}_after_unmerge"] = worst((after - before).abs().max().item())
    # unload(merge=True): plain Megatron layers again, RowParallelLinear's own input handling restored
    plain = da.unload(model, merge=True)
    if variant == "parallel" or world == 1:  # Megatron's own gather_output=True needs CUDA (mappings.py)
        with torch.no_grad():
            results[f"{variant}_unloaded_vs_adapted"] = worst((plain(X) - before).abs().max().item())
    results[f"{variant}_unloaded"] = [type(plain.fc1).__name__, type(plain.fc2).__name__,
                                      plain.fc2.input_is_parallel]

# 2. replicated factors agree across TP ranks even when ranks were seeded differently
model = build()
torch.manual_seed(100 + rank)
da.inject(model, da.LoraConfig(r=R, target_modules=["fc1", "fc2"], init_lora_weights=False))
spread = 0.0
for n, p in model.named_parameters():
    if p.requires_grad and n not in SHARD_DIM:
        copies = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(copies, p.detach(), group=tp_group)
        spread = max(spread, max((c - copies[0]).abs().max().item() for c in copies))
results["replicated_spread_differently_seeded"] = spread
results["layer_types"] = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "tp_size")})

# 3. the full adapter a seed produces (TP 1 and TP 2 runs compare these files), and a few SGD steps
model = lora(build())
init_sd = da.adapter_state_dict(model)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
for step in range(3):
    opt.zero_grad()
    loss = ((model(X) - G) ** 2).mean()
    loss.backward()
    opt.step()
trained_sd = da.adapter_state_dict(model)
save_megatron_shards(model, os.path.join(out_dir, f"trained_shards_tp{world}"))  # for `dist-adapters consolidate`
if rank == 0:
    save_file(init_sd, os.path.join(out_dir, f"init_tp{world}.safetensors"))
    save_file(trained_sd, os.path.join(out_dir, f"trained_tp{world}.safetensors"))
if world == 1:  # a plain nn.Linear model, LoRA injected from the same RNG state: the same init
    torch.manual_seed(0)
    plain = nn.Sequential()
    plain.add_module("fc1", nn.Linear(H, FFN))
    plain.add_module("fc2", nn.Linear(FFN, H))
    torch.manual_seed(1)
    da.inject(plain, da.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False))
    theirs = da.adapter_state_dict(plain)
    results["tp1_vs_plain_lora_init"] = max((theirs[k] - v).abs().max().item() for k, v in init_sd.items())
    results["tp1_vs_plain_keys_equal"] = sorted(theirs) == sorted(init_sd)

# 4. adapter_state_dict = gathered math; save_adapter -> load_adapter into a fresh TP model
model = lora(build())
factors = randomize(model)
sd = da.adapter_state_dict(model)
full = {**full_base(model), **factors}
results["state_dict_vs_gathered"] = max((sd[f"base_model.model.{n.replace('.default', '')}"] - v).abs().max().item()
                                        for n, v in factors.items())
results["state_dict_shapes"] = {k: list(v.shape) for k, v in sd.items()}
with torch.no_grad():
    expected = model(X)
da.save_adapter(model, os.path.join(out_dir, "adapter"))
fresh = build()  # no adapter yet: load_adapter injects from adapter_config.json
da.load_adapter(fresh, os.path.join(out_dir, "adapter"))
with torch.no_grad():
    results["loaded_vs_saved"] = worst((fresh(X) - expected).abs().max().item())
wrong = lora(build(), seed=5)
da.load_adapter(wrong, os.path.join(out_dir, "adapter"))  # overwrites another init
with torch.no_grad():
    results["loaded_over_other_init"] = worst((wrong(X) - expected).abs().max().item())

# 5. per-rank export: read offline (rank 0) equals adapter_state_dict
shards = os.path.join(out_dir, f"shards_tp{world}")
save_megatron_shards(model, shards)
if rank == 0:
    back = read_megatron_shards(shards)
    results["shards_keys_equal"] = sorted(back) == sorted(sd)
    results["shards_vs_state_dict"] = max((back[k] - v).abs().max().item() for k, v in sd.items())
    results["shard_dirs"] = sorted(d for d in os.listdir(shards) if d.startswith("mp_rank"))
    save_file({k: v.contiguous() for k, v in full.items() if ".lora_" not in k}, os.path.join(out_dir, "base.safetensors"))
    save_file({"x": X, "y": expected}, os.path.join(out_dir, "io.safetensors"))

# 6. unsupported options fail loudly, naming the option
def refusal(build_model, config=None):
    try:
        da.inject(build_model(), config or da.LoraConfig(target_modules=["fc1"]))
    except NotImplementedError as exc:
        return str(exc)
    return None


def moe_experts():
    """Megatron-core's MoE experts (SequentialMLP: one MLP of expert-parallel linears per expert)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN,
                            num_moe_experts=2, moe_ffn_hidden_size=FFN, use_cpu_initialization=True,
                            add_bias_linear=False, tensor_model_parallel_size=world)
    holder = nn.Module()
    holder.experts = SequentialMLP(2, cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                         linear_fc2=RowParallelLinear),
                                   pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    return holder


def dora_against_plain(variant):
    """DoRA over the column- and row-parallel MLP against the same MLP of nn.Linear layers with our
    (engine-free) DoRA and the full factors: initial magnitudes, output, merge / unmerge."""
    model = build(variant)
    torch.manual_seed(1)
    da.inject(model, da.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False,
                                   use_dora=True))
    w = full_base(model)
    factors = {n: (all_gather_cat(p, SHARD_DIM[n]) if n in SHARD_DIM and world > 1 else p.detach().clone())
               for n, p in model.named_parameters() if ".lora_" in n and "magnitude" not in n}
    magnitudes = {n: (all_gather_cat(p, 0) if n.startswith("fc1") and world > 1 else p.detach().clone())
                  for n, p in model.named_parameters() if "magnitude" in n}
    plain = nn.Module()
    plain.fc1, plain.fc2 = nn.Linear(H, FFN), nn.Linear(FFN, H)
    with torch.no_grad():
        for layer in ("fc1", "fc2"):
            getattr(plain, layer).weight.copy_(w[f"{layer}.base_layer.weight"])
            getattr(plain, layer).bias.copy_(w[f"{layer}.base_layer.bias"])
    da.inject(plain, da.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if n in factors:
                p.copy_(factors[n])
        for layer in (plain.fc1, plain.fc2):
            layer.enable_dora("default")  # the magnitude from the full weight and factors
    plain_params = dict(plain.named_parameters())
    got = {"magnitudes": max((magnitudes[n] - plain_params[n]).abs().max().item() for n in magnitudes)}
    with torch.no_grad():  # magnitudes away from the norms (m / n != 1), the same in both models
        g = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if "magnitude" in n:
                plain_params[n].mul_(1 + 0.5 * torch.rand(plain_params[n].shape, generator=g))
                p.copy_(local_slice("fc1.lora_B.default.weight", plain_params[n]) if n.startswith("fc1")
                        else plain_params[n])
    with torch.no_grad():
        expected = plain.fc2(F.gelu(plain.fc1(X)))
        got["output"] = (model(X) - expected).abs().max().item()
        da.merge(model)
        got["merged"] = (model(X) - expected).abs().max().item()
        da.unmerge(model)
        got["unmerged"] = (model(X) - expected).abs().max().item()
    return got


for variant in ("parallel", "gathered"):
    results[f"dora_{variant}"] = dora_against_plain(variant)


class One(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.fc1 = ColumnParallelLinear(H, FFN, config=kw.pop("cfg", config()), init_method=nn.init.zeros_, bias=True,
                                        **kw)


results["refused_bias"] = refusal(lambda: One(), da.LoraConfig(target_modules=["fc1"], bias="all"))
results["refused_no_weight"] = refusal(lambda: One(skip_weight_param_allocation=True))
results["refused_dora"] = refusal(lambda: One(), da.LoraConfig(target_modules=["fc1"], use_dora=True, lora_dropout=0.1))
results["refused_disable_grad_reduce"] = refusal(lambda: One(disable_grad_reduce=True))
if world > 1:
    results["sequence_parallel_error"] = refusal(lambda: MLP(cfg=config(sequence_parallel=True)))
    results["refused_expert"] = refusal(lambda: One(is_expert=True))
    results["refused_moe_experts"] = refusal(moe_experts, da.LoraConfig(target_modules="all-linear"))
    parallel_state.destroy_model_parallel()  # last: the pipeline-parallel export refusal
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=world)
    try:
        save_megatron_shards(model, os.path.join(out_dir, "pipeline"))
        results["refused_pipeline"] = None
    except NotImplementedError as exc:
        results["refused_pipeline"] = str(exc)

if rank == 0:
    with open(result_file, "w") as fh:
        json.dump(results, fh, indent=1)
leave_process_group()
