"""The package layout: --help works, the core is apart from hf_decorr.app, no import cycles, no ../shared."""

import ast
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from transformers import HfArgumentParser

from hf_decorr import DecorrSeq2SeqTrainingArguments, DecorrTrainingArguments

PACKAGE_DIR = os.path.join(REPO_ROOT, "hf_decorr")


# ------------------------------------------------------------------------------------------ --help


def _run_help(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), "--help"], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=300)


@pytest.mark.parametrize("script", ["recipes/text_classification.py", "recipes/causal_lm.py"])
def test_recipe_help_exits_0_and_lists_the_decorr_options(script):
    proc = _run_help(script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in ("--decorr_weight", "--decorr_layers", "--decorr_penalty", "--model_name_or_path",
                   "--output_dir"):
        assert option in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("arguments", [DecorrTrainingArguments, DecorrSeq2SeqTrainingArguments])
def test_hf_argument_parser_help(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        HfArgumentParser(arguments).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--decorr_weight" in out and "--decorr_variance_share" in out


def test_trl_config_help(capsys):
    pytest.importorskip("trl")
    from hf_decorr.trl import DecorrSFTConfig

    with pytest.raises(SystemExit) as exit_info:
        HfArgumentParser(DecorrSFTConfig).parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--decorr_weight" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["dimensionality", "xor", "image_autoencoder"])
def test_paper_recipe_help_formats(name):
    """Every help string of the paper recipes' argument dataclasses survives argparse's %-formatting."""
    import importlib.util

    path = os.path.join(REPO_ROOT, "recipes", "paper", f"{name}.py")
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(f"paper_recipe_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
    classes = [obj for obj in vars(module).values()
               if isinstance(obj, type) and obj.__name__.endswith("Arguments") and obj.__module__ == spec.name]
    assert classes
    for cls in classes:
        assert "--output_dir" in HfArgumentParser(cls).format_help()


# ------------------------------------------------------------------------------------- the layout


def _modules() -> dict[str, str]:
    """``{dotted module name: path}`` of every module of the hf_decorr package."""
    out = {}
    for root, _, names in os.walk(PACKAGE_DIR):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, REPO_ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: str, top_level_only: bool) -> set[str]:
    """The hf_decorr modules that ``module`` imports (resolved, relative imports included)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    nodes = []
    if top_level_only:  # statements that run at import time (also inside top-level try / if)
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            nodes.append(node)
            stack.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "hf_decorr")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_decorr":
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import capture`
    return found


def test_the_module_walk_sees_the_package():
    modules = _modules()
    assert {"hf_decorr", "hf_decorr.trainer", "hf_decorr.app", "hf_decorr.app.parser"} <= set(modules)
    assert "hf_decorr.trainer" in _imports("hf_decorr", modules["hf_decorr"], top_level_only=True)
    assert "hf_decorr.app.parser" in _imports("hf_decorr.app.data", modules["hf_decorr.app.data"], True)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: sorted(_imports(name, path, top_level_only=True) & set(modules)) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _application(name: str) -> bool:
    """The application package, and ``hf_decorr.__main__`` (``python -m hf_decorr``: it only runs the
    ``hf-decorr`` command of ``hf_decorr.app.commands``; never imported by the core)."""
    return name in ("hf_decorr.app", "hf_decorr.__main__") or name.startswith("hf_decorr.app.")


def test_the_core_never_imports_the_application_package():
    for name, path in _modules().items():
        if _application(name):
            continue
        bad = sorted(m for m in _imports(name, path, top_level_only=False)
                     if m == "hf_decorr.app" or m.startswith("hf_decorr.app."))
        assert not bad, f"{name} imports {bad}"


def test_the_core_neither_prints_nor_exits():
    for name, path in _modules().items():
        if _application(name):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("print", "exit", "quit"), f"{name}:{node.lineno} calls {node.func.id}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit":
                assert not (isinstance(node.func.value, ast.Name) and node.func.value.id in ("sys", "os")), \
                    f"{name}:{node.lineno} calls exit"
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                pytest.fail(f"{name}:{node.lineno} uses SystemExit")


def test_importing_the_core_does_not_load_the_application_package():
    code = ("import sys, hf_decorr, hf_decorr.model_card, hf_decorr.plotting\n"
            "bad = sorted(m for m in sys.modules if m.startswith('hf_decorr.app'))\n"
            "print(','.join(bad))\n")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


def test_no_product_file_depends_on_shared():
    """Recipes, configs, docs and the package run on a fresh clone: nothing names ../shared."""
    offenders = []
    for top in ("recipes", "hf_decorr", "docs", "examples", "README.md"):
        path = os.path.join(REPO_ROOT, top)
        files = [path] if os.path.isfile(path) else [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
        for name in files:
            if name.endswith((".png", ".safetensors", ".bin", ".pyc")):
                continue
            with open(name, encoding="utf-8", errors="replace") as f:
                if "../shared" in f.read():
                    offenders.append(os.path.relpath(name, REPO_ROOT))
    assert offenders == []


def _import_froms(path: str, module: str):
    """``(target module, imported name, line)`` of every ``from … import name`` of an hf_decorr module."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] == "hf_decorr":
            for alias in node.names:
                yield target, alias.name, node.lineno


def test_no_module_imports_a_private_name_of_another_except_compat():
    modules = _modules()
    bad = [f"{name}:{line} imports {target}.{imported}"
           for name, path in modules.items() for target, imported, line in _import_froms(path, name)
           if imported.startswith("_") and not imported.startswith("__") and target != "hf_decorr._compat"
           and f"{target}.{imported}" not in modules]
    assert bad == []


def test_no_import_runs_back_up_to_a_package():
    """A module never imports names from a package above it (its ``__init__``): the arrows point down.

    ``from . import submodule`` is allowed (it names a module, not the package's own namespace).
    """
    modules = _modules()
    packages = {name for name, path in modules.items() if path.endswith("__init__.py")}
    bad = []
    for name, path in modules.items():
        for target, imported, line in _import_froms(path, name):
            above = target in packages and (name == target or name.startswith(target + "."))
            if above and name != target and f"{target}.{imported}" not in modules:
                bad.append(f"{name}:{line} imports {imported} from the package {target}")
    assert bad == []


def test_penalties_are_never_told_apart_by_identity_or_name_outside_the_registry():
    """A penalty carries its own fast paths (``kernel``, ``sums``): no module tests which penalty it is."""
    bad = []
    for name, path in _modules().items():
        if name == "hf_decorr.penalties":
            continue
        text = open(path, encoding="utf-8").read()
        for needle in ("_cov_l1_of_covariance", 'name == "l1"', "name == 'l1'", 'name == "cov_l1"', ".fn is "):
            if needle in text:
                bad.append(f"{name} names {needle!r}")
    assert bad == []


def test_the_trainer_keeps_overrides_and_delegates():
    """trainer.py ≤ 600 lines, DecorrTrainerMixin ≤ 400 lines, compute_loss ≤ 40 lines."""
    path = os.path.join(PACKAGE_DIR, "trainer.py")
    source = open(path, encoding="utf-8").read()
    assert len(source.splitlines()) <= 600
    [mixin] = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "DecorrTrainerMixin"]
    assert mixin.end_lineno - mixin.lineno + 1 <= 400
    [loss] = [n for n in mixin.body if isinstance(n, ast.FunctionDef) and n.name == "compute_loss"]
    assert loss.end_lineno - loss.lineno + 1 <= 40
