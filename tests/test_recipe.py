"""The recipe: demo run, world-size invariance (real torchrun), resume, data order, inputs."""

import json
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import dist_adapters as da
from dist_adapters.recipe.builtin import builtin_model, builtin_tokenizer
from dist_adapters.recipe.data import global_batch_indices, micro_batches
from dist_adapters.recipe.train import train
from recipe_helpers import DEMO, adapter_tensors, cli, config, max_adapter_diff, small


def _probe_ids():
    tok = builtin_tokenizer()
    return tok(["<|bos|>abcdef<|sep|>fedcba<|eos|>", "<|bos|>jihgfedcba<|sep|>"], padding=True,
               return_tensors="pt")["input_ids"]


def test_demo_config_two_ranks_loss_falls_and_peft_reproduces(tmp_path):
    out = tmp_path / "demo"
    res = cli("train", DEMO, "--set", f"train.output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"step", "loss", "lr", "tokens_per_s", "seconds"} <= set(rows[0])
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out / "checkpoints")) == ["step_10", "step_20", "step_30"]
    assert "PeftModel.from_pretrained" in res.stdout
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out / "base_model")
    ids = _probe_ids()
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]).eval()
    base_logits = base(input_ids=ids).logits.detach()
    theirs = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ours = da.load_adapter(AutoModelForCausalLM.from_pretrained(str(out / "base_model")), str(out / "adapter")).eval()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5
        assert (ours(input_ids=ids).logits - base_logits).abs().max() > 1e-2


def test_peft_reproduces_the_trained_in_memory_model(tmp_path):
    summary = train(config(tmp_path / "run", **{"train.steps": 5}))
    trained = summary["model"].eval()
    ids = _probe_ids()
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "base_model")),
                                       str(tmp_path / "run" / "adapter")).eval()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max() <= 1e-5


def test_none_world1_equals_ddp_world2(tmp_path):
    """The signature property: same seed and global batch 8, micro batch 2 on 1 rank (4 micro
    steps) vs micro batch 4 on each of 2 ranks (1 micro step): the same adapter."""
    lora_only = {"adapter.trainable_token_indices": "null"}
    one = cli("train", DEMO, "--set", *small(tmp_path / "one", **lora_only, **{"train.micro_batch_size": 2}))
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli("train", DEMO, "--set", *small(tmp_path / "two", **lora_only, **{
        "train.micro_batch_size": 4, "parallel.strategy": "ddp", "launch.nproc_per_node": 2}))
    assert two.returncode == 0, two.stderr[-3000:]
    diff = max_adapter_diff(tmp_path / "one", tmp_path / "two")
    print(f"max |adapter diff| none@1 vs ddp@2 after 4 steps: {diff:.2e}")
    assert diff <= 1e-4
    b = [v for k, v in adapter_tensors(tmp_path / "one").items() if "lora_B" in k]
    assert min(t.abs().max().item() for t in b) > 1e-3  # the adapters really trained


def test_resume_equals_uninterrupted(tmp_path):
    train(config(tmp_path / "full"))
    train(config(tmp_path / "half", **{"train.steps": 2}))
    ckpt = tmp_path / "half" / "checkpoints" / "step_2"
    assert sorted(os.listdir(ckpt)) == ["adapter", "optimizer.pt", "rng_rank0.pt", "trainer_state.json"]
    train(config(tmp_path / "resumed", **{"train.resume_from": str(ckpt)}))
    diff = max_adapter_diff(tmp_path / "full", tmp_path / "resumed")
    print(f"max |adapter diff| resumed vs uninterrupted: {diff:.2e}")
    assert diff <= 1e-5
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]


@pytest.mark.parametrize("world, micro", [(1, 1), (1, 8), (2, 1), (2, 4), (4, 2), (8, 1)])
def test_data_order_is_independent_of_world_size_and_micro_batch(world, micro):
    for step in (0, 5, 11, 12, 40):  # 100 samples / 8 = 12 steps per epoch: crosses epochs
        indices = global_batch_indices(step, 100, 8, seed=3)
        assert len(set(indices)) == 8
        got = [i for r in range(world) for mb in micro_batches(indices, r, world, micro) for i in mb]
        assert got == indices
    assert global_batch_indices(12, 100, 8, 3) != global_batch_indices(0, 100, 8, 3)  # new epoch, new order


def test_user_model_directory_and_jsonl_data(tmp_path):
    tok = builtin_tokenizer()
    model_dir = tmp_path / "my-model"
    builtin_model(7, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|sep|>") == tok.convert_tokens_to_ids("<|sep|>")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello {i} world"}) + "\n" for i in range(20)))
    summary = train(config(tmp_path / "run", **{"model.path": str(model_dir), "data.path": str(data),
                                                 "train.steps": 3, "train.checkpoint_every": 10}))
    assert summary["last_loss"] < summary["first_loss"]
    written = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(model_dir)
    assert not (tmp_path / "run" / "base_model").exists()


def _one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_gives_one_line_errors(tmp_path):
    _one_line_error(cli("train", str(tmp_path / "nope.yaml")), "config file", "nope.yaml", "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    _one_line_error(cli("train", str(bad)), "unknown key 'train.stepz'", "bad.yaml")
    _one_line_error(cli("train", DEMO, "--set", "train.lrr=0.1"), "unknown key 'train.lrr' in --set")
    _one_line_error(cli("train", DEMO, "--set", "adapter.rank=4"), "unknown key 'adapter.rank'")
    _one_line_error(cli("train", DEMO, "--set", "parallel.strategy=magic"), "unknown parallel.strategy 'magic'")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "ok"}\n{"text": "ok"}\n{"txt": "no"}\n')
    _one_line_error(cli("train", DEMO, "--set", f"data.path={data}", "--set", f"train.output_dir={tmp_path}/o"),
                    "data.jsonl:3:", '"text"')
    data.write_text('{"text": "ok"}\n{not json\n')
    _one_line_error(cli("train", DEMO, "--set", f"data.path={data}", "--set", f"train.output_dir={tmp_path}/o"),
                    "data.jsonl:2: not valid JSON")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line_error(cli("train", DEMO, "--set", f"train.output_dir={blocker}/out"),
                    "train.output_dir", "a-file/out", "not writable")
    _one_line_error(cli("train", DEMO, "--set", "train.micro_batch_size=3"),
                    "global_batch_size (16) must be a multiple of train.micro_batch_size (3)")
    _one_line_error(cli("train", DEMO, "--set", "parallel.strategy=tp"),
                    "parallel.tp_size (1) must equal the world size (2)")
    _one_line_error(cli("train", DEMO, "--set", "parallel.tp_size=2"), "parallel.tp_size 2 needs parallel.strategy tp")
    _one_line_error(cli("train", DEMO, "--set", "parallel.strategy=fsdp2_tp", "parallel.tp_size=3"),
                    "parallel.tp_size (3) must divide the world size (2)")
    _one_line_error(cli("train", DEMO, "--set", f"train.resume_from={tmp_path}/none"), "does not exist")


def test_trainable_tokens_none_world1_equals_ddp_world2(tmp_path):
    tokens = "[256, 257, 259]"
    one = cli("train", DEMO, "--set", *small(tmp_path / "one", **{
        "adapter.trainable_token_indices": tokens, "train.micro_batch_size": 2}))
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli("train", DEMO, "--set", *small(tmp_path / "two", **{
        "adapter.trainable_token_indices": tokens, "train.micro_batch_size": 4,
        "parallel.strategy": "ddp", "launch.nproc_per_node": 2}))
    assert two.returncode == 0, two.stderr[-3000:]
    rows = adapter_tensors(tmp_path / "one")["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (3, 128)
    diff = max_adapter_diff(tmp_path / "one", tmp_path / "two")
    print(f"max |adapter diff| with trainable tokens, none@1 vs ddp@2: {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(os.path.dirname(DEMO))) if f.endswith(".yaml")
                                        and not f.startswith("accelerate_")))
def test_shipped_configs_are_valid(name):
    from dist_adapters.recipe.config import load_recipe

    from dist_adapters.recipe.config import check_world
    from dist_adapters.recipe.train import STRATEGIES

    from dist_adapters.recipe import loftq, quantization
    from dist_adapters.recipe.config import adapter_config

    cfg = load_recipe(os.path.join(os.path.dirname(DEMO), name))
    assert cfg["parallel"]["strategy"] in STRATEGIES
    assert check_world(cfg, cfg["launch"]["nproc_per_node"] * cfg["launch"]["nnodes"]) >= 1
    adapter = adapter_config(cfg)
    if cfg["model"]["quantization"] is not None:
        quantization.settings(cfg)
    if loftq.wants_loftq(adapter):
        loftq.check(cfg, adapter)
