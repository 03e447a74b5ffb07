"""Issue 20: data formats, the completion-only loss mask, packing and evaluation in the recipe."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from dist_adapters.recipe.builtin import _byte_alphabet, builtin_model, builtin_tokenizer
from dist_adapters.recipe.config import RecipeError
from dist_adapters.recipe.data import TokenizedData
from dist_adapters.recipe.dataset import load_run_data
from dist_adapters.recipe.formats import render, tokenize
from dist_adapters.recipe.packing import PackedData, pack_rows
from dist_adapters.recipe.sources import Record
from dist_adapters.recipe.train import train
from recipe_helpers import DEMO, cli, config, max_adapter_diff, small

PACKED_LOSS_TOL = 1e-5    # relative per-sample loss, packed row vs alone (issue); measured 0 eager, 8.7e-8 sdpa
PACKED_ADAPTER_TOL = 1e-4  # vs none@1, packed (issue); measured 0 ddp@2, fsdp2@2 (same sums in order), 3.9e-6 zero3, 2.5e-5 tp
EVAL_LOSS_TOL = 1e-6       # relative, eval_loss across world sizes; measured 0

RECORDS = [{"prompt": "<|bos|>abc<|sep|>", "completion": "cba<|eos|>"},
           {"prompt": "<|bos|>hello<|sep|>", "completion": "olleh<|eos|>"},
           {"prompt": "<|bos|>xy<|sep|>", "completion": "yx"}]


def _write_all_formats(root, records) -> dict[str, str]:
    """The same records as JSONL, JSON, Parquet and a datasets save_to_disk directory."""
    import datasets

    paths = {k: str(root / f"data.{k}") for k in ("jsonl", "json", "parquet")}
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "data.json").write_text(json.dumps(records))
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(paths["parquet"])
    ds.save_to_disk(str(root / "saved"))
    paths["datasets"] = str(root / "saved")
    return paths


def _cfg(path, **data):
    return {"data": {"path": path, "seq_len": 32, "format": "auto", "train_on": None, "packing": False,
                     "eval_path": None, "eval_fraction": 0.0, **data}}


def test_every_file_kind_gives_the_same_samples(tmp_path):
    tok = builtin_tokenizer()
    loaded = {kind: load_run_data(_cfg(path), tok).train for kind, path in _write_all_formats(tmp_path, RECORDS).items()}
    rows = {kind: (data.rows, data.labels) for kind, data in loaded.items()}
    assert all(r == rows["jsonl"] for r in rows.values()), rows
    ids, labels = rows["jsonl"][0][1], rows["jsonl"][1][1]
    # "<|bos|>hello<|sep|>" is 7 tokens, none labelled; "olleh<|eos|>" all labelled, no second EOS
    assert labels == [-100] * 7 + ids[7:] and len(ids) == 13 and ids[-1] == tok.eos_token_id
    assert rows["jsonl"][0][2][-1] == tok.eos_token_id  # "yx": an EOS appended, and labelled
    assert rows["jsonl"][1][2][-1] == tok.eos_token_id


def _merging_tokenizer(chat_template=None):
    """One token per byte, plus one merge: "c" + "d" -> "cd", which crosses the boundary of a
    prompt ending in "c" and a completion starting with "d"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    vocab["cd"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("c", "d")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = chat_template
    return fast


def test_a_token_across_the_prompt_completion_boundary_is_a_completion_token():
    tok = _merging_tokenizer()
    sample = tokenize(render(Record("x", {"prompt": "abc", "completion": "def"}), "prompt_completion", tok), tok,
                      "completion")
    pieces = [tok.convert_ids_to_tokens(i) for i in sample.ids]
    assert pieces == ["a", "b", "cd", "e", "f", "<|eos|>"]  # the merge really crosses the boundary
    assert sample.labels == [-100, -100] + sample.ids[2:]
    # re-tokenising the pieces (prompt alone) would give "a b c": 3 prompt tokens, and mask "cd" away
    assert len(tok("abc")["input_ids"]) == 3


def test_chat_template_masks_exactly_the_assistant_turns_even_across_a_merge():
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}."
                "{% else %}Q{{ m['content'] }}{% endif %}{% endfor %}")
    tok = _merging_tokenizer(template)
    messages = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "def"},
                {"role": "user", "content": "ab"}, {"role": "assistant", "content": "cde"}]
    sample = tokenize(render(Record("x", {"messages": messages}), "messages", tok), tok, "completion")
    pieces = [tok.convert_ids_to_tokens(i) for i in sample.ids]
    assert pieces == ["Q", "a", "b", "cd", "e", "f", ".", "Q", "a", "b", "cd", "e", "."]
    carries = [label != -100 for label in sample.labels]
    assert carries == [False, False, False, True, True, True, True, False, False, False, True, True, True]
    assert [l for l in sample.labels if l != -100] == [i for i, c in zip(sample.ids, carries) if c]
    assert tok.decode(sample.prompt_ids) == "Qabcdef.Qab" and sample.reference == "cde"


def test_chatml_template_labels_are_the_assistant_segments():
    """A ChatML-style template (system, user, assistant turns with <|im_start|>/<|im_end|>): the
    labelled tokens are exactly those of each assistant turn's "content<|im_end|>\\n"."""
    tok = builtin_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye"}]
    sample = tokenize(render(Record("x", {"messages": messages}), "messages", tok), tok, "completion")
    expected = sum((tok(text + "<|im_end|>\n", add_special_tokens=False)["input_ids"] for text in ("hello", "bye")), [])
    assert [l for l in sample.labels if l != -100] == expected
    assert tok.decode(sample.prompt_ids).endswith("and?<|im_end|>\n<|im_start|>assistant\n")
    everything = tokenize(render(Record("x", {"messages": messages}), "messages", tok), tok, "all")
    assert everything.labels == everything.ids


def test_pack_rows_is_best_fit_and_keeps_every_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 16) for _ in range(300)]
    rows = pack_rows(lengths, 16)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 16) * 1.05 + 1  # within 5% of the bound


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_packed_row_gives_each_sample_its_own_loss(attn):
    tok = builtin_tokenizer()
    model = builtin_model(0, tok).eval()
    model.set_attn_implementation(attn)
    records = [Record(str(i), {"prompt": f"<|bos|>{w}<|sep|>", "completion": w[::-1] + "<|eos|>"})
               for i, w in enumerate(["abcdefg", "hij", "aabbccdd", "j", "fedcba"])]
    data = TokenizedData([tokenize(render(r, "prompt_completion", tok), tok, "completion") for r in records],
                         24, tok.pad_token_id)
    packed = PackedData(data)
    assert len(packed) < len(data)  # several samples share a row

    def token_losses(batch, positions=True):
        inputs = batch.model_inputs() if positions else {"input_ids": batch.input_ids, "use_cache": False}
        with torch.no_grad():
            logits = model(**inputs).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100,
                               reduction="none").view(batch.labels.shape[0], -1)

    alone = {s: token_losses(data.batch([s]))[0].sum().item() for s in range(len(data))}
    packed_batch = packed.batch(list(range(len(packed))))
    losses, unmasked = token_losses(packed_batch), token_losses(packed_batch, positions=False)
    worst = fault = 0.0
    for r, samples in enumerate(packed.row_samples):
        at = 0
        for s in samples:
            n = len(data.rows[s])
            worst = max(worst, abs(losses[r, at:at + n - 1].sum().item() - alone[s]) / alone[s])
            fault = max(fault, abs(unmasked[r, at:at + n - 1].sum().item() - alone[s]) / alone[s])
            at += n
    print(f"packed loss difference {worst:.2e}, without restarting positions {fault:.2e}")
    assert worst <= PACKED_LOSS_TOL, worst
    assert fault > 100 * PACKED_LOSS_TOL, fault  # without restarting positions the samples see each other


def _task(path, n, seed, messages=False):
    """Random prompts, one constant completion: only the completion can be learned."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(6, 12)))
            record = ({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok done"}]}
                      if messages else {"prompt": f"<|bos|>{prompt}<|sep|>", "completion": "ok done<|eos|>"})
            fh.write(json.dumps(record) + "\n")


def test_completion_only_loss_learns_the_completion_and_all_tokens_cannot(tmp_path):
    results = {}
    for name, messages, train_on in (("pc", False, None), ("messages", True, None), ("all", False, "all")):
        path = tmp_path / f"{name}.jsonl"
        _task(path, 400, seed=1, messages=messages)
        over = {"data.path": str(path), "data.eval_fraction": 0.1, "train.steps": 40, "train.eval_every": 40,
                "train.eval_generate": 8, "train.lr": 1e-2}
        if train_on:
            over["data.train_on"] = train_on
        summary = train(config(tmp_path / name, **over))
        results[name] = summary
    for name in ("pc", "messages"):
        assert results[name]["last_loss"] < 0.5 and results[name]["last_eval"]["eval_loss"] < 0.5, results[name]
        assert results[name]["last_eval"]["eval_exact_match"] == 1.0
        assert results[name]["first_eval"]["eval_exact_match"] == 0.0
    assert results["all"]["last_loss"] > 0.5 and results["all"]["last_eval"]["eval_loss"] > 0.5, results["all"]
    rows = [json.loads(line) for line in (tmp_path / "pc" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] * 8 + [40] * 8 and all(r["completion"] == "ok done" for r in rows[8:])


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    runs = {}
    # zero3 and tp too: evaluation and lock-step generation where every forward gathers parameters,
    # and where both ranks hold the same samples (tensor parallel)
    for name, strategy, nproc in (("none", "none", 1), ("ddp", "ddp", 2), ("fsdp2", "fsdp2", 2), ("zero3", "zero3", 2),
                                  ("tp", "tp", 2)):
        extra = {"parallel.tp_size": 2} if strategy == "tp" else {}
        over = {**extra, "data.packing": "true", "data.eval_fraction": 0.02, "train.eval_generate": 4, "train.steps": 4,
                "parallel.strategy": strategy, "launch.nproc_per_node": nproc}
        res = cli("train", DEMO, "--set", *small(root / name, **over))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = (root / name, res.stdout)
    return runs


def test_packing_trains_the_same_adapter_at_any_world_size(packed_runs):
    reference = packed_runs["none"][0]
    assert "packed into" in packed_runs["none"][1] and "% filled" in packed_runs["none"][1]
    evals = {}
    for name, (run, _) in packed_runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals[name] = rows[-1]["eval_loss"]
        if name != "none":
            print(f"packed {name}: adapter difference {max_adapter_diff(reference, run):.2e}")
            assert max_adapter_diff(reference, run) <= PACKED_ADAPTER_TOL, name
    assert all(abs(v - evals["none"]) <= EVAL_LOSS_TOL * evals["none"] for v in evals.values()), evals
    generated = {name: [json.loads(line)["completion"] for line in (run / "samples.jsonl").read_text().splitlines()]
                 for name, (run, _) in packed_runs.items()}
    assert all(len(g) == 8 and g == generated["none"] for g in generated.values()), generated


def test_tokenizer_path_and_a_missing_pad_token(tmp_path):
    """model.tokenizer_path overrides the model's tokenizer; without a pad token, EOS pads, said
    in the start line, and padded positions carry no loss."""
    from dist_adapters.recipe.preflight import load_tokenizer

    tok = builtin_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer({"model": {"path": None, "tokenizer_path": str(tmp_path / "tok")}})
    assert loaded.pad_token_id is None and loaded.chat_template == tok.chat_template
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    run_data = load_run_data(_cfg(str(tmp_path / "d.jsonl")), loaded)
    assert f"padding with EOS (id {loaded.eos_token_id})" in run_data.summary()
    batch = run_data.train.batch([0, 2])
    assert batch.input_ids[1, -1] == loaded.eos_token_id and batch.labels[1, -1] == -100


def test_bad_data_values_are_named(tmp_path):
    tok = builtin_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(RecipeError, match=r"bad.jsonl:1: no assistant message"):
        load_run_data(_cfg(str(bad)), tok)
    bad.write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(RecipeError, match="data.train_on: completion needs prompt/completion"):
        load_run_data(_cfg(str(bad), train_on="completion"), tok)
    bad.write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "def"}) + "\n")
    with pytest.raises(RecipeError, match="train.eval_generate needs prompts"):
        load_run_data({**_cfg(str(bad), eval_fraction=0.5), "train": {"eval_generate": 4}}, tok)
