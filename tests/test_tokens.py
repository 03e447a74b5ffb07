"""Trainable tokens: peft interop (standalone / with LoRA, tied / untied), rows-only merges,
the tied head, O(k x d) memory, and every error."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft import TrainableTokensConfig as PeftTrainableTokensConfig
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dist_adapters as da
from dist_adapters.layers.tokens import TiedTokensHead, TrainableTokensLayer
from helpers import LOGITS_TOL, logits, max_diff, randomize_trainable, tiny_llama, trainable_count

IDS = [3, 5, 7, 100]
MODES = {
    "standalone": (lambda: da.TrainableTokensConfig(token_indices=IDS),
                   lambda: PeftTrainableTokensConfig(token_indices=IDS)),
    "lora-list": (lambda: da.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=IDS),
                  lambda: PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=IDS)),
    "lora-dict": (lambda: da.LoraConfig(r=4, target_modules=["o_proj"], trainable_token_indices={"embed_tokens": IDS}),
                  lambda: PeftLoraConfig(r=4, target_modules=["o_proj"], trainable_token_indices={"embed_tokens": IDS})),
}


@pytest.fixture(params=[(m, t) for m in MODES for t in (False, True)],
                ids=[f"{m}-{'tied' if t else 'untied'}" for m in MODES for t in (False, True)])
def case(request):
    mode, tie = request.param
    ours, theirs = MODES[mode]
    return ours, theirs, (lambda: tiny_llama(tie=tie)), tie


def test_interop_ours_to_peft(case, tmp_path):
    ours_cfg, _, make, tie = case
    model = da.inject(make(), ours_cfg())
    # init_weights=True: a no-op. Untied heads run the same ops (bitwise); a tied head recomputes
    # the chosen tokens' logits with its own F.linear, which rounds differently on some CPUs
    # (measured: 0 on Intel, 3e-8 on AMD EPYC)
    assert max_diff(logits(model), logits(make())) <= (3e-7 if tie else 0.0)
    randomize_trainable(model)
    expected = logits(model)
    da.save_adapter(model, str(tmp_path))
    theirs = PeftModel.from_pretrained(make(), str(tmp_path))
    assert max_diff(logits(theirs), expected) <= LOGITS_TOL
    assert max_diff(expected, logits(make())) > 1e-3
    keys = list(da.adapter_state_dict(model))
    assert sum("trainable_tokens_delta" in k for k in keys) == 1  # a tied head is not saved twice


def test_interop_peft_to_ours(case, tmp_path):
    _, theirs_cfg, make, tie = case
    theirs = get_peft_model(make(), theirs_cfg())
    randomize_trainable(theirs, seed=5)
    theirs.save_pretrained(str(tmp_path))
    ours = da.load_adapter(make(), str(tmp_path))
    assert max_diff(logits(ours), logits(theirs)) <= LOGITS_TOL  # measured 0 to 3.6e-7
    assert isinstance(ours.lm_head, TiedTokensHead) == tie


def test_trainable_counts_and_keys_equal_peft(case):
    ours_cfg, theirs_cfg, make, tie = case
    ours, theirs = da.inject(make(), ours_cfg()), get_peft_model(make(), theirs_cfg())
    assert trainable_count(ours) == trainable_count(theirs)
    from peft import get_peft_model_state_dict

    peft_keys = {k for k in get_peft_model_state_dict(theirs) if not k.startswith("base_model.model.lm_head.")}
    assert set(da.adapter_state_dict(ours)) == peft_keys


@pytest.mark.parametrize("tie", [False, True])
def test_after_training_only_chosen_rows_of_the_merged_embedding_differ(tie):
    model = da.inject(tiny_llama(tie=tie), da.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=IDS))
    base_weight = model.model.embed_tokens.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 3, 9, 5, 7, 100, 2, 3]])
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    before = logits(model)
    da.merge(model)
    assert max_diff(logits(model), before) <= LOGITS_TOL  # measured 1.2e-7
    merged = model.model.embed_tokens.base_layer.weight
    changed = (merged != base_weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == IDS
    others = [i for i in range(merged.shape[0]) if i not in IDS]
    assert torch.equal(merged[others], base_weight[others])  # bit-identical
    da.unmerge(model)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, base_weight)
    plain = da.unload(model, merge=True)
    assert max_diff(logits(plain), before) <= LOGITS_TOL
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tie


class BiasedTiedLM(nn.Module):
    """Embedding + a biased output head sharing its weight."""

    def __init__(self, vocab=50, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=True)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.head.bias)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_head_uses_the_same_rows_and_keeps_its_bias():
    model = da.inject(BiasedTiedLM(), da.TrainableTokensConfig(token_indices=[4, 9], init_weights=False))
    assert isinstance(model.head, TiedTokensHead) and isinstance(model.embed, TrainableTokensLayer)
    rows = model.embed.trainable_tokens_delta["default"].weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["embed.trainable_tokens_delta.default.weight"]
    ids = torch.tensor([[1, 4, 9, 2]])
    with torch.no_grad():
        out = model(ids)
        hidden = torch.tanh(model.mix(model.embed(ids)))
        expected = hidden @ model.embed.base_layer.weight.T + model.head.base_layer.bias
        expected[..., [4, 9]] = hidden @ rows.T + model.head.base_layer.bias[[4, 9]]
    assert max_diff(out, expected) <= 1e-6  # measured 0.0
    assert max_diff(model.embed(ids)[0, 1], rows[0]) == 0
    da.merge(model)
    assert max_diff(model(ids), out) <= LOGITS_TOL  # measured 1.2e-7
    plain = da.unload(model)
    assert plain.head.weight is plain.embed.weight and plain.head.bias is not None


def test_init_false_draws_random_rows():
    model = da.inject(tiny_llama(), da.TrainableTokensConfig(token_indices=IDS, init_weights=False))
    assert max_diff(logits(model), logits(tiny_llama())) > 1e-3


def test_rows_leaf_and_uniform_requires_grad():
    model = da.inject(tiny_llama(tie=True), da.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=IDS))
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    assert list(rows.children()) == [] and [p for p in rows.parameters()] == [rows.weight]
    assert not model.model.embed_tokens.base_layer.weight.requires_grad


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_vocab_sized_tensor_in_forward_or_backward():
    """Rule 2: with V x d = 20000 x 16, nothing of that size is built; peft's layer does."""
    vocab, dim = 20000, 16

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, dim)
            self.proj = nn.Linear(dim, 4)

        def forward(self, ids):
            return self.proj(self.embed_tokens(ids))

    ids = torch.randint(0, vocab, (4, 32))
    ids[:, :4] = torch.tensor([11, 12, 13, 14])
    results = {}
    for name, build in (("ours", lambda m: da.inject(m, da.TrainableTokensConfig(token_indices=[11, 12, 13, 14]))),
                        ("peft", lambda m: get_peft_model(m, PeftTrainableTokensConfig(
                            token_indices=[11, 12, 13, 14], target_modules=["embed_tokens"])))):
        model = build(Tiny())
        with LargestTensor() as mode:
            model(ids).square().sum().backward()
        results[name] = mode.largest
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert [tuple(g.shape) for g in grads] == [(4, dim)]
    assert results["ours"] < vocab * dim // 10, results
    assert results["peft"] >= vocab * dim  # the reference does build the full matrix


def test_several_adapters_and_disabled():
    model = da.inject(tiny_llama(), da.TrainableTokensConfig(token_indices=[3, 5]))
    da.inject(model, da.TrainableTokensConfig(token_indices=[7]), adapter_name="b")
    randomize_trainable(model)
    da.set_adapter(model, "b")
    randomize_trainable(model, seed=9)
    out_b = logits(model)
    with da.disabled(model):
        assert torch.equal(logits(model), logits(tiny_llama()))
    da.set_adapter(model, "default")
    assert max_diff(logits(model), out_b) > 1e-4


@pytest.mark.parametrize("build, message", [
    (lambda m: da.inject(m, da.TrainableTokensConfig(token_indices=[3, 128])),
     r"trainable tokens on 'model.embed_tokens': token indices \[128\] are out of range for an embedding of 128 rows"),
    (lambda m: da.inject(da.inject(m, da.TrainableTokensConfig(token_indices=[3, 5])),
                         da.TrainableTokensConfig(token_indices=[5, 6]), adapter_name="b"),
     r"adapter 'b' claims token indices \[5\] that adapter 'default' already trains"),
    (lambda m: da.inject(m, da.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1])),
     r"the module is also a LoRA target"),
    (lambda m: da.inject(m, da.TrainableTokensConfig(token_indices=[1], target_modules=["lm_head"])),
     r"trainable tokens on 'lm_head': the module is a Linear; trainable tokens need an nn.Embedding"),
    (lambda m: da.inject(m, da.TrainableTokensConfig(token_indices=[1], target_modules=["embeddings"])),
     r"trainable tokens target 'embeddings' matches no module"),
    (lambda m: da.inject(m, da.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 2])),
     r"LoraConfig.trainable_token_indices has duplicate token indices \[2\]"),
    (lambda m: da.inject(m, da.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": []})),
     r"LoraConfig.trainable_token_indices\['embed_tokens'\] is empty"),
])
def test_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_llama())
