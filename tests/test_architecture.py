"""The map of docs/architecture.md holds: the import graph of dist_adapters/ (built with ast from
the source, function-local imports included, nothing executed) has no circle, the layers import
no engine, checkpoint, recipe, inject or control module, the engine modules do not import each
other, and the README's strategy table is the one in parallel/strategies.py."""

from __future__ import annotations

import ast
import os
import re

import pytest

from dist_adapters.parallel.strategies import STRATEGIES, markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dist_adapters")
ENGINE_MODULES = {f"dist_adapters.parallel.{m}" for m in ("ddp", "fsdp", "deepspeed", "tensor", "expert", "megatron",
                                                                   "dtensor")}
LAYERS_MAY_NOT_IMPORT = ("dist_adapters.parallel", "dist_adapters.checkpoint", "dist_adapters.recipe",
                         "dist_adapters.inject", "dist_adapters.control")


def _modules(package_dir: str) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(package_dir):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = os.path.relpath(path[:-3], os.path.dirname(package_dir)).replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def import_graph(package_dir: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file (top level or in a function)."""
    modules = _modules(package_dir)
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets = set()
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:  # "from . import fsdp" imports the module fsdp
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_an_injected_circle():
    # the fault this test file guards against, injected: (a) of the issue that removed it
    graph = {"inject": {"init.loftq", "layers.lora"}, "init.loftq": {"checkpoint.peft_format"},
             "checkpoint.peft_format": {"inject"}, "layers.lora": set()}
    assert find_cycles(graph) == [["checkpoint.peft_format", "init.loftq", "inject"]]
    graph["checkpoint.peft_format"] = set()
    assert find_cycles(graph) == []


def test_the_graph_sees_function_local_imports(tmp_path):
    pkg = tmp_path / "dist_adapters"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(str(pkg))
    assert graph["dist_adapters.a"] == {"dist_adapters.sub.b"} and graph["dist_adapters.sub.b"] == {"dist_adapters.a"}
    assert find_cycles(graph) == [["dist_adapters.a", "dist_adapters.sub.b"]]


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 40  # the whole package was read
    assert find_cycles(graph) == []


def test_layers_import_no_engine_checkpoint_recipe_inject_or_control():
    bad = {(m, t) for m, targets in import_graph().items() if m.startswith("dist_adapters.layers")
           for t in targets if t.startswith(LAYERS_MAY_NOT_IMPORT)}
    assert bad == set()


def test_integrations_import_no_recipe_or_engine_and_nothing_imports_them():
    """A Trainer owns the loop and the sharding: integrations/ uses the collective save and
    unwrap, never the recipe or an engine file; the library itself never imports transformers'
    Trainer glue (docs/architecture.md)."""
    graph = import_graph()
    mine = {m for m in graph if m.startswith("dist_adapters.integrations")}
    assert "dist_adapters.integrations.transformers" in mine
    bad = {(m, t) for m in mine for t in graph[m] if t.startswith("dist_adapters.recipe") or t in ENGINE_MODULES}
    users = {m for m, targets in graph.items() if m not in mine and targets & mine}
    assert bad == set() and users == set()


def test_layers_know_no_engine_by_name():
    words = re.compile(r"ds_shape|DTensor|FSDP|fsdp|deepspeed|DeepSpeed|ZeRO|zero3")
    hits = []
    for name, path in _modules(PACKAGE).items():
        if name.startswith("dist_adapters.layers"):
            with open(path, encoding="utf-8") as fh:
                hits += [f"{path}:{i}: {line.strip()}" for i, line in enumerate(fh, 1) if words.search(line)]
    assert hits == []


def test_engine_modules_do_not_import_each_other():
    graph = import_graph()
    assert ENGINE_MODULES <= set(graph)
    bad = {(m, t) for m in ENGINE_MODULES for t in graph[m] if t in ENGINE_MODULES}
    assert bad == set()


def test_only_the_strategy_table_names_strategies():
    """No ``strategy == "zero3"``-style branch outside parallel/strategies.py: a comparison with a
    strategy name anywhere else would be an if-ladder over engines. ("none" is left out: it is also
    the bias setting's value.)"""
    names = set(STRATEGIES) - {"none"}
    assert len(names) >= 8
    hits = []
    for name, path in _modules(PACKAGE).items():
        if name == "dist_adapters.parallel.strategies":
            continue
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                constants = [c for c in ast.walk(node) if isinstance(c, ast.Constant)]
                hits += [f"{path}:{node.lineno}" for c in constants if c.value in names]
    assert hits == []


def test_comments_cite_only_files_in_the_repository():
    gone = re.compile(r"DESIGN\.md|FIELD-NOTES|[Ss]hard rule \d")
    cited = re.compile(r"\b((?:docs|tests|benchmarks|configs|examples)/[\w./-]+\.(?:md|py|yaml|json))")
    bad = []
    for path in _modules(PACKAGE).values():
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if gone.search(line):
                    bad.append(f"{path}:{i}: {line.strip()}")
                bad += [f"{path}:{i}: {ref}" for ref in cited.findall(line)
                        if not os.path.exists(os.path.join(ROOT, ref.rstrip(".")))]
    assert bad == []


def test_readme_strategy_table_is_the_strategy_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert markdown_table() in readme


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_row_command_configures_that_strategy(name):
    """The README's command for each strategy (from its table row) selects that strategy and
    passes the recipe's validation for the world it launches."""
    import shlex

    from dist_adapters.recipe.config import check_world, launch_world_size, load_recipe

    argv = shlex.split(STRATEGIES[name].command)
    assert argv[:2] == ["dist-adapters", "train"]
    overrides = [a for a in argv[3:] if a != "--set"]
    cfg = load_recipe(os.path.join(ROOT, argv[2]), overrides)
    assert cfg["parallel"]["strategy"] == name
    assert check_world(cfg, launch_world_size(cfg["launch"])) >= 1


def test_documented_map_exists():
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as fh:
        text = fh.read()
    for heading in ("How to add an engine", "How to add a layer kind", "How to add a checkpoint reader"):
        assert heading in text
    for rule in range(1, 6):
        assert f"{rule}. " in text
