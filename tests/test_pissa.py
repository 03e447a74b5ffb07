"""PiSSA and OLoRA (init/pissa.py) against real peft 0.21.2: the same initial product s B A and
residual base weight (compared as products: SVD and QR signs are free), Linear (Llama) and
Conv1D (GPT-2); and the conversion of a trained adapter into a plain rank-2r LoRA on the
original base (peft's path_initial_model_for_weight_conversion)."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import dist_adapters as da
from helpers import MODELS, input_ids, logits, max_diff, randomize_trainable

TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _decaying(model, arch):
    """Give every targeted weight singular values 4^-i (well separated), so that the top-r
    subspace is unique and the randomized SVD (pissa_niter_K) finds it as the exact one does."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in TARGETS[arch]:
                w = module.weight
                u, _ = torch.linalg.qr(torch.randn(w.shape[0], w.shape[0], generator=g))
                v, _ = torch.linalg.qr(torch.randn(w.shape[1], w.shape[1], generator=g))
                k = min(w.shape)
                w.copy_(u[:, :k] @ torch.diag(4.0 ** -torch.arange(k, dtype=torch.float32)) @ v[:, :k].T)
    return model


def _products(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (s B A as [out, in], base weight as [out, in])} of every LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            weight = module.base_layer.weight
            weight = weight.T if getattr(module, "fan_in_fan_out", False) else weight
            out[name.replace("base_model.model.", "")] = ((b @ a) * module.scaling["default"], weight)
    return out


@pytest.mark.parametrize("arch,how", [("llama", "pissa"), ("llama", "pissa_niter_4"), ("llama", "olora"),
                                      ("gpt2", "pissa"), ("gpt2", "pissa_niter_4")])
def test_initial_product_and_residual_equal_peft(arch, how):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=how)
    ours = da.inject(_decaying(MODELS[arch](), arch), da.LoraConfig(**kwargs))
    theirs = get_peft_model(_decaying(MODELS[arch](), arch), PeftLoraConfig(**kwargs))
    a, b = _products(ours), _products(theirs)
    assert sorted(a) == sorted(b) and a
    worst_product = max(max_diff(a[k][0], b[k][0]) for k in a)
    worst_residual = max(max_diff(a[k][1], b[k][1]) for k in a)
    print(f"{arch} {how}: s B A {worst_product:.2e}, residual {worst_residual:.2e}")
    assert worst_product <= 1e-5 and worst_residual <= 1e-5  # measured <= 3e-7
    assert min(a[k][0].abs().max().item() for k in a) > 0.01  # the principal part really moved (measured 0.099)
    # the adapted model is the base model at step 0
    assert max_diff(logits(ours), logits(_decaying(MODELS[arch](), arch))) <= 1e-5


@pytest.mark.parametrize("how", ["pissa", "olora"])
def test_converted_adapter_reproduces_the_trained_model_on_the_original_base(how, tmp_path):
    base = MODELS["llama"]
    ours = da.inject(base(), da.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                           init_lora_weights=how))
    da.save_adapter(ours, str(tmp_path / "init"))
    randomize_trainable(ours, scale=0.05)  # "training"
    trained = logits(ours)
    da.save_adapter(ours, str(tmp_path / "lora"), convert_from=str(tmp_path / "init"))
    theirs = PeftModel.from_pretrained(base(), str(tmp_path / "lora"))  # the original base
    config = theirs.peft_config["default"]
    assert config.r == 8 and config.lora_alpha == 16 and config.init_lora_weights is True
    diff = max_diff(logits(theirs), trained)
    print(f"{how}: converted rank-2r LoRA on the original base vs the trained model: {diff:.2e}")
    assert diff <= 1e-5  # measured 1.5e-7
    assert max_diff(trained, logits(base())) > 1e-3
    ours_again = da.load_adapter(base(), str(tmp_path / "lora"))
    assert max_diff(logits(ours_again), trained) <= 1e-5


def test_weight_inits_refuse_what_they_cannot_run_on():
    with pytest.raises(ValueError, match="init_lora_weights='pissa' runs on unquantized linear layers"):
        da.inject(MODELS["llama"](), da.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="the initial adapter has no"):
        from dist_adapters.init.pissa import convert_to_lora

        convert_to_lora({"base_model.model.x.lora_A.weight": torch.ones(2, 3)}, {})
    assert input_ids() is not None


@pytest.fixture(scope="module")
def pissa_single(tmp_path_factory):
    """The demo recipe with adapter.init_lora_weights: pissa on one process (plain SGD)."""
    from recipe_helpers import SGD, train_run

    return train_run(tmp_path_factory.mktemp("pissa_single"), **SGD, **{"adapter.init_lora_weights": "pissa"})


@pytest.mark.parametrize("strategy,extra", [("fsdp2", {}), ("zero3", {}), ("fsdp1", {}), ("tp", {"parallel.tp_size": 2})])
def test_pissa_recipe_under_each_engine_equals_single_process(pissa_single, tmp_path, strategy, extra):
    """PiSSA in the recipe: the residual base goes to OUTPUT/base_model and the initial adapter to
    OUTPUT/pissa_init; 2 ranks train the adapter of one process; peft reproduces the run on the
    residual base, and the converted rank-2r LoRA reproduces it on the original (built-in) base."""
    from transformers import AutoModelForCausalLM

    from dist_adapters.recipe import builtin
    from equivalence import assert_equivalent
    from recipe_helpers import SGD, SGD_TOL, assert_peft_reproduces, train_run

    out = train_run(tmp_path / "run", **SGD, **{"adapter.init_lora_weights": "pissa", "parallel.strategy": strategy,
                                                "launch.nproc_per_node": 2, **extra})
    assert_equivalent(out, pissa_single, SGD_TOL, f"pissa {strategy}@2 vs none@1")
    assert (out / "pissa_init" / "adapter_model.safetensors").is_file()
    assert_peft_reproduces(out)
    residual = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    original = builtin.builtin_model(0, builtin.builtin_tokenizer())
    assert max_diff(residual.model.layers[0].self_attn.q_proj.weight,
                    original.model.layers[0].self_attn.q_proj.weight) > 1e-3  # the base really is the residual
    trained = da.load_adapter(residual, str(out / "adapter"))
    da.save_adapter(trained, str(tmp_path / "lora"), convert_from=str(out / "pissa_init"))
    ids = input_ids()
    with torch.no_grad():
        on_original = PeftModel.from_pretrained(original, str(tmp_path / "lora")).eval()(input_ids=ids).logits
        expected = trained.eval()(input_ids=ids).logits
    assert (on_original - expected).abs().max() <= 1e-5


def test_pissa_with_qlora_quantizes_the_residual(tmp_path):
    """PiSSA with model.quantization, as peft documents it: the factorisation runs on the
    full-precision weight and the residual is quantized (OUTPUT/base_model holds the residual in
    full precision; the run loads it through bitsandbytes). At step 0 the 4-bit residual plus the
    principal part is closer to the full-precision model than the 4-bit model itself (logits)."""
    from transformers import AutoModelForCausalLM

    from dist_adapters.recipe import builtin
    from recipe_helpers import DEMO, cli, small
    from test_quantized import Q4, _quantized

    for name, init in (("pissa", "pissa"), ("plain", "true")):
        out = tmp_path / name
        res = cli("train", DEMO, "--set", *small(out, **{"model.quantization": "{bits: 4}", "train.steps": 2,
                                                        "adapter.init_lora_weights": init,
                                                        "adapter.trainable_token_indices": "null"}))
        assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "pissa" / "pissa_init" / "adapter_model.safetensors").is_file()
    residual = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pissa" / "base_model"))
    original = builtin.builtin_model(0, builtin.builtin_tokenizer())
    assert max_diff(residual.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight) > 1e-3
    ids = input_ids()
    start = da.load_adapter(_quantized(str(tmp_path / "pissa" / "base_model"), Q4), str(tmp_path / "pissa" / "pissa_init"))
    with torch.no_grad():
        full = original.eval()(input_ids=ids).logits
        quantized = _quantized(str(tmp_path / "plain" / "base_model"), Q4).eval()(input_ids=ids).logits
        pissa = start.eval()(input_ids=ids).logits
    err_q, err_pissa = (quantized - full).abs().mean().item(), (pissa - full).abs().mean().item()
    print(f"step 0, mean |logits - full precision|: 4-bit {err_q:.4f}, 4-bit residual + PiSSA {err_pissa:.4f}")
    assert err_pissa < 0.9 * err_q  # measured 0.246 vs 0.309
    ours = da.load_adapter(_quantized(str(tmp_path / "pissa" / "base_model"), Q4), str(tmp_path / "pissa" / "adapter"))
    assert ours is not None
