"""Issue 17, rule 5: every error a user can cause through the CLI is one line naming the file,
line, key or option, exit code 2, no traceback, raised before any process is started, and it
changes nothing that existed (rule 4).

One table, each case a real process (forked, 2 at a time, from one that imported the CLI). Every case asserts: exit code 2, no "Traceback",
at most 2 stderr lines, each expected fragment (the file / key / option) in stderr, and no
output directory left behind; after the whole table, every file that existed before has the
same sha256 and no new file or directory appeared in the inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from recipe_helpers import DEMO, ROOT, cli_forked, config

# name: (argv after `dist-adapters`, fragments stderr must hold, path that must not be created)
# "{root}" is the fixture's directory of inputs; "--set" values are the recipe's.
TRAIN = ["train", DEMO, "--set", "train.output_dir={root}/out", "train.steps=2", "data.eval_fraction=0",
         "train.eval_every=0", "train.eval_generate=0", "train.micro_batch_size=4"]
CASES = {
    # a target_modules typo, and other adapter settings the model cannot take (meta-device inject)
    "target-typo": (TRAIN + ["adapter.target_modules=[q_prj]"], ["'q_prj'", "target_modules"], "out"),
    "target-typo-ddp": (TRAIN + ["adapter.target_modules=[q_prj]", "parallel.strategy=ddp",
                                 "launch.nproc_per_node=2"], ["'q_prj'"], "out"),
    "target-typo-zero3": (TRAIN + ["adapter.target_modules=[v_prj]", "parallel.strategy=zero3",
                                   "launch.nproc_per_node=2"], ["'v_prj'"], "out"),
    "layers-out-of-range": (TRAIN + ["adapter.target_modules=[q_proj]", "adapter.layers_to_transform=[7]"],
                            ["layers_to_transform=[7]"], "out"),
    # trainable-token indices out of range
    "token-index": (TRAIN + ["adapter.trainable_token_indices=[1,5000]"], ["[5000]", "260 rows"], "out"),
    "token-index-dict": (TRAIN + ["adapter.trainable_token_indices={embed_tokens: [9999]}"], ["[9999]"], "out"),
    # data files
    "data-not-utf8": (TRAIN + ["data.path={root}/latin1.jsonl"], ["latin1.jsonl:3:", "UTF-8"], "out"),
    "data-no-text-key": (TRAIN + ["data.path={root}/nokey.jsonl"], ["nokey.jsonl:2:", '"text"'], "out"),
    "data-bad-json": (TRAIN + ["data.path={root}/badjson.jsonl"], ["badjson.jsonl:2: not valid JSON"], "out"),
    "data-missing": (TRAIN + ["data.path={root}/nope.jsonl"], ["data.path", "nope.jsonl"], "out"),
    "data-no-samples": (TRAIN + ["data.path={root}/blank.jsonl"], ["blank.jsonl", "no samples"], "out"),
    "data-all-empty": (TRAIN + ["data.path={root}/empty_texts.jsonl"], ["empty_texts.jsonl", "nothing to learn"],
                       "out"),
    "data-unknown-format": (TRAIN + ["data.path={root}/question.jsonl"], ["question.jsonl:1:", "data.format"], "out"),
    "data-no-assistant": (TRAIN + ["data.path={root}/no_assistant.jsonl"], ["no_assistant.jsonl:2:", "assistant"],
                          "out"),
    "data-bad-message": (TRAIN + ["data.path={root}/bad_message.jsonl"], ["bad_message.jsonl:1:", "messages[1]"],
                         "out"),
    "data-bad-parquet": (TRAIN + ["data.path={root}/broken.parquet"], ["broken.parquet", "Parquet"], "out"),
    "data-format-unknown": (TRAIN + ["data.format=csv"], ["data.format", "'csv'"], "out"),
    "data-completion-on-text": (TRAIN + ["data.path={root}/empty_texts.jsonl", "data.train_on=completion"],
                                ["data.train_on", "empty_texts.jsonl"], "out"),
    "eval-without-data": (TRAIN + ["train.eval_every=5"], ["train.eval_every",
                                                                                   "data.eval_path"], "out"),
    "compile-unverified-engine": (TRAIN + ["parallel.compile=true", "parallel.strategy=zero3", "launch.nproc_per_node=2"],
                                  ["parallel.compile", "zero3", "none, ddp, fsdp2"], "out"),
    "compile-not-bool": (TRAIN + ["parallel.compile=yes please"], ["parallel.compile", "true or false"], "out"),
    "eval-fraction-range": (TRAIN + ["data.eval_fraction=1.5"], ["data.eval_fraction", "1.5"], "out"),
    "eval-path-missing": (TRAIN + ["data.eval_path={root}/nope.jsonl"],
                          ["data.eval_path", "nope.jsonl"], "out"),
    "tokenizer-path-missing": (TRAIN + ["model.tokenizer_path={root}/nowhere"], ["model.tokenizer_path", "nowhere"],
                               "out"),
    # model directories
    "model-no-tokenizer": (TRAIN + ["model.path={root}/no_tokenizer", "adapter.trainable_token_indices=null"],
                           ["model.path", "no_tokenizer", "tokenizer"], "out"),
    "model-missing": (TRAIN + ["model.path={root}/nowhere"], ["model.path", "nowhere"], "out"),
    "model-empty-dir": (TRAIN + ["model.path={root}/empty_dir"], ["model.path", "empty_dir"], "out"),
    # resuming
    # a checkpoint without the engine-neutral dcp/ (written before issue 22) under another strategy
    "resume-other-strategy": (TRAIN + ["train.resume_from={root}/old_step_2", "parallel.strategy=fsdp2",
                                       "launch.nproc_per_node=2"], ["old_step_2", "'none'", "'fsdp2'", "dcp/"], "out"),
    "resume-zero-from-none": (TRAIN + ["train.resume_from={root}/old_step_2", "parallel.strategy=zero2",
                                       "launch.nproc_per_node=2"], ["old_step_2", "'zero2'"], "out"),
    "resume-missing": (TRAIN + ["train.resume_from={root}/run/checkpoints/step_9"], ["step_9", "does not exist"],
                       "out"),
    "resume-not-a-checkpoint": (TRAIN + ["train.resume_from={root}/empty_dir"], ["empty_dir", "trainer_state.json"],
                                "out"),
    # values and keys
    "config-missing": (["train", "{root}/nope.yaml"], ["config file", "nope.yaml", "does not exist"], None),
    "unknown-strategy": (TRAIN + ["parallel.strategy=magic"], ["parallel.strategy", "'magic'"], "out"),
    "batch-not-divisible": (TRAIN + ["train.micro_batch_size=3"], ["train.micro_batch_size (3)"], "out"),
    "tp-size-without-tp": (TRAIN + ["parallel.tp_size=2"], ["parallel.tp_size 2 needs parallel.strategy tp"],
                           "out"),
    "tp-world-mismatch": (TRAIN + ["parallel.strategy=tp", "launch.nproc_per_node=2"],
                          ["parallel.tp_size (1) must equal the world size (2)"], "out"),
    "ep-size-without-ep": (TRAIN + ["parallel.ep_size=2"], ["parallel.ep_size 2 needs parallel.strategy ep"], "out"),
    "ep-on-a-dense-model": (TRAIN + ["parallel.strategy=ep", "parallel.ep_size=2", "launch.nproc_per_node=2"],
                            ["parallel.strategy ep", "no mixture-of-experts layer"], "out"),
    "ep-size-vs-experts": (TRAIN + ["model.builtin=moe", "parallel.strategy=ep", "parallel.ep_size=3",
                                    "launch.nproc_per_node=3", "train.global_batch_size=12"],
                           ["parallel.ep_size 3 must divide the number of experts per layer (8)"], "out"),
    "hf-ep-size-not-world": (TRAIN + ["model.builtin=moe", "parallel.strategy=hf_ep", "parallel.ep_size=2",
                                      "launch.nproc_per_node=4", "train.global_batch_size=16"],
                             ["parallel.ep_size (2) must equal the world size (4)"], "out"),
    "modules-to-save-under-tp": (TRAIN + ["parallel.strategy=tp", "parallel.tp_size=2", "launch.nproc_per_node=2",
                                          "adapter.modules_to_save=[lm_head]"],
                                 ["adapter.modules_to_save", "'tp'"], "out"),
    "lr-not-a-number": (TRAIN + ["train.lr=fast"], ["train.lr", "--set", "'fast'"], "out"),
    "lr-in-yaml": (["train", "{root}/bad_lr.yaml"], ["bad_lr.yaml", "train.lr"], None),
    "unknown-key": (TRAIN + ["train.stepz=3"], ["train.stepz"], "out"),
    "overwrite-not-bool": (TRAIN + ["train.overwrite=maybe"], ["train.overwrite", "true or false"], "out"),
    "peft-option": (TRAIN + ["adapter.use_qalora=true"], ["adapter.use_qalora", "peft feature"], "out"),
    # output directories (nothing existing is replaced)
    "output-holds-a-run": (["train", DEMO, "--set", "train.output_dir={root}/run", "train.steps=2"],
                           ["{root}/run", "train.overwrite", "train.resume_from: auto"], None),
    "output-is-a-file": (["train", DEMO, "--set", "train.output_dir={root}/a_file"], ["a_file", "is a file"], None),
    "output-not-writable": (["train", DEMO, "--set", "train.output_dir={root}/a_file/out"],
                            ["train.output_dir", "a_file/out", "not writable"], None),
    "overwrite-and-resume": (TRAIN + ["train.overwrite=true", "train.resume_from=auto"],
                             ["train.overwrite", "train.resume_from"], "out"),
    # launching
    "hostfile-with-torchrun": (["launch", "--hostfile", "{root}/hosts_bad", "--", "x.py"],
                               ["--hostfile", "--launcher torchrun"], None),
    "hostfile-malformed": (["launch", "--launcher", "mpirun", "--hostfile", "{root}/hosts_bad", "--", "x.py"],
                           ["hosts_bad:2"], None),
    "recipe-hostfile-torchrun": (TRAIN + ["launch.hostfile={root}/hosts_bad"], ["launch.hostfile"], "out"),
    "launch-bad-int": (["launch", "--nnodes", "two", "--", "x.py"], ["--nnodes", "'two'"], None),
    # consolidate / inspect / loftq
    "consolidate-existing-out": (["consolidate", "{root}/run/checkpoints/step_2", "{root}/run/adapter"],
                                 ["{root}/run/adapter", "--overwrite"], None),
    "consolidate-no-alpha": (["consolidate", "{root}/bare.safetensors", "{root}/converted"],
                             ["--lora-alpha", "--config"], "converted"),
    "consolidate-unsupported-config": (["consolidate", "{root}/qalora", "{root}/converted"],
                                       ["use_qalora", "peft feature"], "converted"),
    "consolidate-bad-dtype": (["consolidate", "{root}/run/adapter", "{root}/converted", "--dtype", "fp8"],
                              ["--dtype", "'fp8'"], "converted"),
    "consolidate-missing-src": (["consolidate", "{root}/nowhere", "{root}/converted"], ["nowhere"], "converted"),
    "inspect-missing": (["inspect", "{root}/nowhere"], ["nowhere"], None),
    "loftq-missing-model": (["loftq", "{root}/nowhere", "{root}/loftq_out"], ["nowhere"], "loftq_out"),
}


def _tree_hashes(root) -> dict[str, str]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root) + "/"] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def _inputs(root) -> None:
    """What the table's cases point at: broken data files, model directories, a finished run."""
    from safetensors.torch import load_file, save_file

    from dist_adapters.recipe.train import train
    from helpers import tiny_llama

    (root / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (root / "nokey.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    (root / "badjson.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (root / "blank.jsonl").write_text("\n\n")
    (root / "question.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (root / "no_assistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                     {"role": "assistant", "content": "b"}]}) + "\n"
                                             + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    (root / "bad_message.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                    {"role": "assistant"}]}) + "\n")
    (root / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (root / "empty_texts.jsonl").write_text('{"text": ""}\n' * 32)
    (root / "empty_dir").mkdir()
    tiny_llama().save_pretrained(str(root / "no_tokenizer"))
    (root / "a_file").write_text("not a directory")
    (root / "hosts_bad").write_text("node-a slots=2\nnode-b slotz=2\n")
    (root / "bad_lr.yaml").write_text(f"train:\n  lr: fast\n  output_dir: {root}/out\n")
    train(config(root / "run", **{"train.steps": 2, "train.checkpoint_every": 2}))
    old = root / "old_step_2"  # as a checkpoint from before the neutral layout: no dcp/
    shutil.copytree(root / "run" / "checkpoints" / "step_2", old)
    shutil.rmtree(old / "dcp")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("dcp/")}
    (old / "manifest.json").write_text(json.dumps(manifest))
    tensors = load_file(str(root / "run" / "adapter" / "adapter_model.safetensors"))
    # a bare state-dict file, as a training script saves it (our in-memory names, no config)
    bare = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
            for k, v in tensors.items() if ".lora_" in k}
    save_file(bare, str(root / "bare.safetensors"))
    shutil.copytree(root / "run" / "adapter", root / "qalora")
    qalora = json.loads((root / "qalora" / "adapter_config.json").read_text())
    (root / "qalora" / "adapter_config.json").write_text(json.dumps({**qalora, "use_qalora": True}))


def _own(arg: str, name: str, created) -> str:
    """Each case writes (or must not write) its own output path: cases run two at a time, and a
    shared `out` would let one case's directory look like another's leftover."""
    return arg.replace(f"{{root}}/{created}", f"{{root}}/{created}.{name}") if created else arg


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    _inputs(root)
    before = _tree_hashes(root)
    argvs = {name: [_own(a, name, created).replace("{root}", str(root)) for a in argv]
             for name, (argv, _, created) in CASES.items()}
    results = cli_forked(argvs)
    return root, before, _tree_hashes(root), results


def test_the_table_has_at_least_25_cases_over_every_command():
    assert len(CASES) >= 25
    assert {argv[0] for argv, _, _ in CASES.values()} == {"train", "launch", "consolidate", "inspect", "loftq"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_naming_it(table, name):
    root, _, _, results = table
    res = results[name]
    _, fragments, created = CASES[name]
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr and 1 <= len(lines) <= 2, res.stderr[-3000:]
    for fragment in fragments:
        assert fragment.replace("{root}", str(root)) in res.stderr, (fragment, res.stderr)
    assert "dist-adapters launch:" not in res.stdout, "no process may be started for bad input"
    if created is not None:
        assert not (root / f"{created}.{name}").exists(), f"{created}.{name} was created"


def test_bad_input_changes_nothing_that_existed(table):
    _, before, after, _ = table
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(set(after) - set(before))
    assert not changed and not added, (changed, added)


def test_under_torchrun_one_rank_reports_the_error(tmp_path):
    """The user's own torchrun (the ranks run the preflight themselves): rank 0 prints the one
    line, the other rank says nothing, and no rank prints a traceback of ours. (torchrun's agent
    then reports the failed ranks its own way.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dist_adapters.cli", "train", DEMO, "--set", f"train.output_dir={tmp_path}/out",
                          "adapter.target_modules=[q_prj]"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert res.returncode != 0
    assert res.stderr.count("dist-adapters train: error: adapter: target_modules entry 'q_prj'") == 1, res.stderr
    assert "dist_adapters/" not in res.stderr and "RecipeError" not in res.stderr, res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr  # every rank exits with the user-error code
    assert not (tmp_path / "out").exists()
