"""DoRA (``use_dora=True``, layers/dora.py) against real peft 0.21.2: Linear (Llama), Conv1D
(GPT-2) and Embedding, both ways, with rank / alpha patterns and modules_to_save; the initial
magnitude, the weight norm (computed here without building B A), gradients, merge / unmerge /
unload, and the |W|^2 cache."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import dist_adapters as da
from dist_adapters.control import adapter_layers
from helpers import LOGITS_TOL, MODELS, input_ids, logits, max_diff, randomize_trainable, trainable_count

CASES = {
    "llama-all-linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-patterns-modules-to-save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                     rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
                                                     modules_to_save=["lm_head"])),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama-dropout": ("llama", dict(r=4, lora_dropout=0.1, target_modules=["k_proj", "down_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"])),
    "gpt2-embedding": ("gpt2", dict(r=4, target_modules=["wte", "c_attn"])),
}


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    arch, kwargs = CASES[request.param]
    return arch, {**kwargs, "use_dora": True}


def test_ours_saved_loads_in_peft(case, tmp_path):
    arch, kwargs = case
    ours = da.inject(MODELS[arch](), da.LoraConfig(**kwargs))
    randomize_trainable(ours)  # magnitudes too: m moves away from |W|
    expected = logits(ours)
    da.save_adapter(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(MODELS[arch](), str(tmp_path))
    assert max_diff(logits(theirs), expected) <= LOGITS_TOL
    assert max_diff(expected, logits(MODELS[arch]())) > 1e-3


def test_peft_saved_loads_in_ours(case, tmp_path):
    arch, kwargs = case
    theirs = get_peft_model(MODELS[arch](), PeftLoraConfig(**kwargs))
    randomize_trainable(theirs, seed=7)
    theirs.save_pretrained(str(tmp_path))
    ours = da.load_adapter(MODELS[arch](), str(tmp_path))
    assert max_diff(logits(ours), logits(theirs)) <= LOGITS_TOL
    assert trainable_count(ours) == trainable_count(theirs)


def _pair(arch, kwargs, init=False):
    """The same DoRA model in peft and here: both initialised from identical random factors."""
    kwargs = {**kwargs, "init_lora_weights": init}
    torch.manual_seed(11)
    theirs = get_peft_model(MODELS[arch](), PeftLoraConfig(**kwargs))
    torch.manual_seed(11)
    ours = da.inject(MODELS[arch](), da.LoraConfig(**kwargs))
    return ours, theirs


def _by_suffix(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters keyed by their name without peft's prefix and adapter segment."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".default", "")
            out[key.removesuffix(".weight")] = p  # peft's embedding factors are ParameterDict entries
    return out


def test_initial_magnitude_and_gradients_equal_peft(case):
    """With random A and B (init_lora_weights=False), peft initialises m to |W + s B A| per row:
    ours (computed without B A) equals it; and one training step's gradients of A, B and m."""
    arch, kwargs = case
    kwargs = {k: v for k, v in kwargs.items() if k != "lora_dropout"}  # same masks are not shared
    ours, theirs = _pair(arch, kwargs)
    a, b = _by_suffix(ours), _by_suffix(theirs)
    assert sorted(a) == sorted(b)
    magnitudes = [k for k in a if "lora_magnitude_vector" in k]
    assert magnitudes
    with torch.no_grad():  # peft's random factors (its draws differ from ours), then our DoRA init
        for key in a:
            if key not in magnitudes:
                a[key].copy_(b[key])
        for _, layer in adapter_layers(ours):
            if "default" in getattr(layer, "lora_magnitude_vector", {}):
                layer.enable_dora("default")
    a = _by_suffix(ours)
    for key in magnitudes:  # measured 1.2e-7 relative
        assert (a[key] - b[key]).abs().max() <= 1e-5 * b[key].abs().max(), key
    ids = input_ids()
    for model in (ours, theirs):
        model.eval()(input_ids=ids, labels=ids).loss.backward()  # eval: GPT-2's own dropout off
    worst = max(((a[k].grad - b[k].grad).abs().max() / b[k].grad.abs().max()).item() for k in a)
    print(f"DoRA gradients, ours vs peft: max relative difference {worst:.2e}")
    assert worst <= 1e-4  # measured 1.7e-6


def test_merge_unmerge_unload_equal_peft(tmp_path):
    """The merged weight is peft's ((m / n) * (W + s B A)); unmerge restores W."""
    ours = da.inject(MODELS["llama"](), da.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                                      use_dora=True))
    randomize_trainable(ours)
    da.save_adapter(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path))
    expected = logits(ours)
    base = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    da.merge(ours)
    assert max_diff(logits(ours), expected) <= LOGITS_TOL
    merged_theirs = theirs.merge_and_unload()
    ours_q = ours.model.layers[0].self_attn.q_proj.base_layer.weight  # noqa: E501
    assert max_diff(ours_q, merged_theirs.model.layers[0].self_attn.q_proj.weight) <= 1e-6  # measured 3e-8
    assert max_diff(ours.model.embed_tokens.base_layer.weight, merged_theirs.model.embed_tokens.weight) <= 1e-6
    assert max_diff(ours_q, base["model.layers.0.self_attn.q_proj.base_layer.weight"]) > 1e-3
    da.unmerge(ours)
    assert max_diff(logits(ours), expected) <= LOGITS_TOL
    assert max(max_diff(p, base[n]) for n, p in ours.named_parameters() if not p.requires_grad) <= 1e-6
    plain = da.unload(ours, merge=True)
    assert max_diff(logits(plain), expected) <= LOGITS_TOL


def test_weight_norm_cache_follows_the_weight(tmp_path):
    """A write into the frozen weight (an init, a load) is seen by the next forward (peft
    recomputes the norm in every forward)."""
    ours = da.inject(MODELS["llama"](), da.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    randomize_trainable(ours)
    da.save_adapter(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path))
    before = logits(ours)
    assert max_diff(before, logits(theirs)) <= LOGITS_TOL
    with torch.no_grad():
        for model in (ours, theirs):
            weight = next(p for n, p in model.named_parameters() if n.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    assert max_diff(logits(ours), logits(theirs)) <= LOGITS_TOL
    assert max_diff(logits(ours), before) > 1e-3


def test_dora_refused_where_it_does_not_run_yet():
    from test_moe import tiny_moe

    with pytest.raises(NotImplementedError, match="use_dora=True on a LoraParameter"):
        da.inject(tiny_moe("mixtral"), da.LoraConfig(r=2, target_parameters=["gate_up_proj"], use_dora=True,
                                                     target_modules=["q_proj"]))


@pytest.fixture(scope="module")
def dora_single(tmp_path_factory):
    """The demo recipe with adapter.use_dora: true on one process (plain SGD: the adapter moves by
    the gradient itself, so a wrong magnitude gradient or norm shows)."""
    from recipe_helpers import SGD, train_run

    return train_run(tmp_path_factory.mktemp("dora_single"), **SGD, **{"adapter.use_dora": "true"})


TP2 = {"parallel.tp_size": 2}


@pytest.mark.parametrize("strategy,ranks,extra", [
    ("ddp", 2, {}), ("fsdp1", 2, {}), ("fsdp2", 2, {}), ("zero3", 2, {}), ("tp", 2, TP2),
    ("fsdp2_tp", 4, {**TP2, "train.micro_batch_size": 2})])
def test_dora_recipe_under_each_engine_equals_single_process(dora_single, tmp_path, strategy, ranks, extra):
    """DoRA trains the same adapter on 2 ranks (fsdp2_tp: 4, a 2 x 2 mesh); FSDP and ZeRO-3 read
    the base weight the unit already gathered for its forward, and the factors inside their own
    forwards; tensor parallel computes the norm from each rank's rows."""
    from equivalence import assert_equivalent
    from recipe_helpers import SGD, SGD_TOL, assert_peft_reproduces, train_run

    out = train_run(tmp_path / "run", **SGD, **{"adapter.use_dora": "true", "parallel.strategy": strategy,
                                                "launch.nproc_per_node": ranks, **extra})
    assert_equivalent(out, dora_single, SGD_TOL, f"dora {strategy}@{ranks} vs none@1")
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in saved)
    if strategy == "ddp":
        # peft computes the weight norm another way (B A built): the built-in model's logits
        # (up to 4.8) agree to 3.5e-6, within the 1e-5
        assert_peft_reproduces(out, tol=1e-5)


def test_dora_and_pissa_on_a_zero3_partitioned_model(tmp_path):
    """tests/dist/zero3_dora.py: the magnitudes of a model built partitioned (zero.Init) start at
    the gathered weight's norms; the engine's logits, merged and unmerged, are one process's; and
    PiSSA on such a model gives the plain model's residual and factors."""
    import json
    import subprocess

    from recipe_helpers import ROOT
    from test_tp import TORCHRUN

    result = tmp_path / "result.json"
    res = subprocess.run([*TORCHRUN, "tests/dist/zero3_dora.py", str(tmp_path), str(result)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(result.read_text())
    print(r)
    assert r["partitioned"]  # the base really was partitioned when the adapter was injected
    assert r["magnitude_vs_plain"] <= 1e-6  # measured 6e-8 (a partition's norm would be far off)
    assert r["logits"] <= LOGITS_TOL and r["merged"] <= 1e-5 and r["unmerged"] <= LOGITS_TOL  # <= 6.4e-7
    assert r["merged_flags"]
    # PiSSA on a partitioned model: gathered, factorised, the residual written into the partitions
    assert r["pissa_partitioned"] and r["pissa_moved"] > 1e-2
    assert r["pissa_residual"] <= 1e-6 and r["pissa_product"] <= 1e-6  # measured 0.0


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_over_a_quantized_base_equals_peft(tmp_path, bits):
    """QLoRA + DoRA: the norm reads the dequantized weight (as peft, per forward); peft reproduces
    our adapter over the same bitsandbytes base; merge requantizes (W + s B A scaled by m / n)."""
    from test_quantized import Q4, _quantized

    base_dir = tmp_path / "base"
    MODELS["llama"]().save_pretrained(base_dir)
    q = {**Q4, "bits": bits}
    ours = _quantized(str(base_dir), q)
    da.inject(ours, da.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    randomize_trainable(ours)
    da.save_adapter(ours, str(tmp_path / "adapter"))
    theirs = PeftModel.from_pretrained(_quantized(str(base_dir), q), str(tmp_path / "adapter")).eval()
    ids = input_ids()
    with torch.no_grad():
        a, b = ours.eval()(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = _quantized(str(base_dir), q).eval()(input_ids=ids).logits
    print(f"DoRA over {bits}-bit: ours vs peft {max_diff(a, b):.2e}")
    assert max_diff(a, b) <= 1e-5 and max_diff(a, base) > 1e-3


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_dora_magnitude_starts_at_the_rewritten_weight(init):
    """LoftQ and PiSSA rewrite the base weight: the magnitude starts at |W' + s B A| of the new
    weight (peft initialises DoRA after those inits), and the cached |W|^2 is the new one's."""
    extra = {"loftq_config": da.LoftQConfig(loftq_bits=4, loftq_iter=1)} if init == "loftq" else {}
    model = da.inject(MODELS["llama"](), da.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                       init_lora_weights=init, **extra))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        adapted = layer.base_layer.weight + layer.scaling["default"] * (layer.lora_B["default"].weight @
                                                                          layer.lora_A["default"].weight)
        assert max_diff(layer.lora_magnitude_vector["default"].weight, adapted.norm(dim=1)) <= 1e-5
        assert max_diff(logits(model), logits(da.unload(model, merge=True))) <= LOGITS_TOL
