"""The documentation site stays true to the code: generated configuration reference, architecture
page, API reference and docstrings, the accelerate configs the multi-GPU page describes, and a
strict build of the whole site."""

import ast
import dataclasses
import glob
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT

DOCS = os.path.join(REPO_ROOT, "docs")
PACKAGE_DIR = os.path.join(REPO_ROOT, "hf_decorr")
PUBLIC_MODULES = ["hf_decorr", "hf_decorr.analysis", "hf_decorr.trl", "hf_decorr.sentence_transformers",
                  "hf_decorr.setfit"]
# the extra each integration module needs (skipped where it is not installed)
NEEDS = {"hf_decorr.trl": "trl", "hf_decorr.sentence_transformers": "sentence_transformers",
         "hf_decorr.setfit": "setfit"}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _public_module(name: str):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    return importlib.import_module(name)


# ------------------------------------------------------------------------ configuration reference


def _config_reference():
    spec = importlib.util.spec_from_file_location(
        "make_config_reference", os.path.join(REPO_ROOT, "scripts", "make_config_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_matches_the_dataclass():
    expected = _config_reference().render()
    committed = _read(os.path.join(DOCS, "configuration.md"))
    assert committed == expected, (
        "docs/configuration.md differs from hf_decorr.config.DecorrConfig: regenerate it with "
        "`python scripts/make_config_reference.py` and commit the result")


def test_configuration_reference_has_every_field_with_its_default():
    from hf_decorr import DecorrConfig

    page = _read(os.path.join(DOCS, "configuration.md"))
    defaults = DecorrConfig()
    for field in dataclasses.fields(DecorrConfig):
        assert f"### `{field.name}`" in page, field.name
        section = page.split(f"### `{field.name}`", 1)[1].split("\n### ", 1)[0]
        value = getattr(defaults, field.name)
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        assert f"- **Default:** `{shown}`" in section, (field.name, shown)
        # the annotation as written (HfArgumentParser, used by other tests, replaces Field.type by evaluated types)
        assert f"- **Type:** `{DecorrConfig.__annotations__[field.name]}`" in section, field.name


def test_configuration_reference_lists_only_the_builtin_penalties_after_a_registration():
    """A penalty registered by a program (or another test) does not change the generated page."""
    from hf_decorr import PENALTIES, register_penalty

    name = "docs_site_test_penalty"
    if name not in PENALTIES:
        register_penalty(name, lambda c: c.abs().mean((-2, -1)), of_covariance=True, description="test only")
    assert name not in _config_reference().render()


# ---------------------------------------------------------------------------- architecture page


def _package_modules() -> dict[str, str]:
    """``dotted name → file`` of every module of hf_decorr (hf_decorr/app included)."""
    modules = {}
    for path in sorted(glob.glob(os.path.join(PACKAGE_DIR, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, REPO_ROOT).replace(os.sep, "/")
        name = rel[:-3].replace("/", ".")
        modules[name.removesuffix(".__init__")] = rel
    return modules


def _imports_of(module: str, rel: str, modules: dict[str, str]) -> set[str]:
    """The hf_decorr modules that ``module`` imports anywhere in its file, relative to ``hf_decorr``."""
    path = os.path.join(REPO_ROOT, rel)
    tree = ast.parse(_read(path), path)
    package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "hf_decorr")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_decorr":
                continue
            for alias in node.names:  # `from . import plotting` imports the module hf_decorr.plotting
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
    found.discard(module)
    return {name.removeprefix("hf_decorr.") for name in found}


def _architecture_rows() -> dict[str, set[str]]:
    """``file → the modules its "may import" cell names`` from the tables of docs/architecture.md."""
    rows = {}
    for line in _read(os.path.join(DOCS, "architecture.md")).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`hf_decorr/[\w/]+\.py`", cells[0]):
            rows[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[2]))
    return rows


def test_architecture_page_lists_every_module_of_the_package():
    page = _read(os.path.join(DOCS, "architecture.md"))
    rows = _architecture_rows()
    missing = [rel for rel in _package_modules().values() if f"`{rel}`" not in page or rel not in rows]
    assert missing == [], f"docs/architecture.md does not describe these modules (add a table row each): {missing}"
    gone = sorted(set(rows) - set(_package_modules().values()))
    assert gone == [], f"docs/architecture.md describes modules that no longer exist: {gone}"


def test_architecture_page_names_every_import_a_module_makes():
    modules = _package_modules()
    rows = _architecture_rows()
    bad = []
    for name, rel in modules.items():
        extra = _imports_of(name, rel, modules) - rows.get(rel, set())
        if extra:
            bad.append(f"{rel} imports {sorted(extra)}, not in its 'may import' cell")
    assert bad == [], "\n".join(bad)


# --------------------------------------------------------------------------- API reference


def _reference_text() -> str:
    return "\n".join(_read(p) for p in sorted(glob.glob(os.path.join(DOCS, "reference", "*.md"))))


def _documented_by_directive(module: str, text: str) -> bool:
    """A ``::: module`` directive that renders the public members (``filters: public``)."""
    for block in re.split(r"\n(?=::: )", text):
        if block.startswith(f"::: {module}\n") and re.search(r"filters:\s*public", block.split("\n\n")[0]):
            return True
    return False


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
    module = _public_module(module_name)
    text = _reference_text()
    missing = [name for name in module.__all__
               if not _documented_by_directive(module_name, text) and not re.search(rf"\b{re.escape(name)}\b", text)]
    assert missing == [], f"docs/reference/*.md does not cover {module_name}.{missing}"


def _own_members(cls: type):
    """``(qualified name, function)`` of the public methods and properties hf_decorr defines on ``cls``."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("hf_decorr"):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, property):
                value = value.fget
            elif isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value):
                yield f"{klass.__module__}.{klass.__qualname__}.{attr}", value


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_and_method_has_a_docstring(module_name):
    module = _public_module(module_name)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not (inspect.getdoc(obj) or "").strip():
                missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                missing += [qualname for qualname, fn in _own_members(obj) if not (fn.__doc__ or "").strip()]
    assert missing == [], f"public names without a docstring: {sorted(set(missing))}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_constant_has_a_docstring_the_reference_shows(module_name):
    """Constants have no ``__doc__``: their docstring is the string literal after the assignment (griffe)."""
    griffe = pytest.importorskip("griffe")
    module = _public_module(module_name)
    loaded = griffe.load(module_name, search_paths=[REPO_ROOT], resolve_aliases=True,
                         resolve_external=False)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            continue
        member = loaded[name]
        if member.is_alias:
            member = member.final_target
        if member.docstring is None or not member.docstring.value.strip():
            missing.append(f"{module_name}.{name}")
    assert missing == [], f"constants without a docstring (a string literal after the assignment): {missing}"


# ------------------------------------------------------------------ accelerate configs (DISTRIBUTED.md)

ACCELERATE_CONFIGS = {  # file → the distributed_type its name promises
    "single_gpu.yaml": "NO",
    "ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
}


def test_the_accelerate_configs_are_the_ones_the_docs_describe():
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO_ROOT, "recipes", "accelerate", "*.yaml")))
    assert found == sorted(ACCELERATE_CONFIGS), "a config was added or removed: update this test and DISTRIBUTED.md"


@pytest.mark.parametrize("filename", sorted(ACCELERATE_CONFIGS))
def test_every_accelerate_config_parses_and_has_the_keys_accelerate_needs(filename):
    path = os.path.join(REPO_ROOT, "recipes", "accelerate", filename)
    config = yaml.safe_load(_read(path))
    assert isinstance(config, dict), filename
    for key in ("compute_environment", "distributed_type", "mixed_precision", "num_machines", "num_processes",
                "machine_rank", "main_training_function", "use_cpu"):
        assert key in config, f"{filename}: no {key}"
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["distributed_type"] == ACCELERATE_CONFIGS[filename], filename
    assert config["mixed_precision"] in ("no", "fp16", "bf16", "fp8"), filename
    assert isinstance(config["use_cpu"], bool) and config["use_cpu"] is False, filename
    for key in ("num_machines", "num_processes", "machine_rank"):
        assert isinstance(config[key], int) and config[key] >= 0, (filename, key)
    assert config["num_machines"] >= 1 and config["num_processes"] >= 1
    assert config["machine_rank"] < config["num_machines"], filename
    if config["distributed_type"] == "NO":
        assert config["num_processes"] == 1, filename
    if config["distributed_type"] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] in (2, 3), filename
    if config["distributed_type"] == "FSDP":
        assert config["fsdp_config"]["fsdp_version"] == 2, filename

    # and accelerate's own loader reads it as the same kind
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(path)
    assert str(loaded.distributed_type).rsplit(".", 1)[-1] == config["distributed_type"], filename
    assert loaded.num_processes == config["num_processes"] and loaded.mixed_precision == config["mixed_precision"]


# ---------------------------------------------------------------- user docs speak of the product


def test_the_docs_speak_only_of_the_product():
    pattern = re.compile(r"HF-NOTES|\bthe issue\b|\bissue \d+|\bthis session\b|\bthe session\b|\bengineers?\b",
                         re.IGNORECASE)
    pages = [p for p in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)]
    pages.append(os.path.join(REPO_ROOT, "CHANGELOG.md"))
    bad = [f"{os.path.relpath(p, REPO_ROOT)}:{i}: {line.strip()[:100]}"
           for p in pages if os.path.exists(p)
           for i, line in enumerate(_read(p).splitlines(), 1) if pattern.search(line)]
    assert bad == [], "\n".join(bad)


# --------------------------------------------------------------------------- the whole site


def test_the_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a broken reference, link or anchor fails the suite."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for page in ("reference/hf_decorr", "configuration", "architecture"):
        assert os.path.exists(tmp_path / "site" / page / "index.html"), page
    reference = (tmp_path / "site" / "reference" / "hf_decorr" / "index.html").read_text(encoding="utf-8")
    for name in importlib.import_module("hf_decorr").__all__:
        assert f'id="hf_decorr.{name}"' in reference, f"{name} is not rendered in the API reference"
    # docstrings are written for this renderer: no raw Sphinx role on any page, and cross-references are links
    raw = []
    for root, _, files in os.walk(tmp_path / "site"):
        for name in files:
            if name.endswith(".html"):
                text = open(os.path.join(root, name), encoding="utf-8").read()
                raw += [f"{name}: {m}" for m in SPHINX_ROLE.findall(text)]
    assert raw == [], f"raw Sphinx roles in the built site: {raw[:10]}"
    assert 'href="#hf_decorr.Penalty"' in reference  # e.g. DecorrTrainerMixin's docstring links to Penalty


SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`[^`]*`")


def test_docstrings_use_no_sphinx_roles():
    """The site renders Markdown with mkdocs-autorefs links (``[`Penalty`][hf_decorr.Penalty]``), not reST roles."""
    found = []
    for root, _, files in os.walk(os.path.join(REPO_ROOT, "hf_decorr")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                text = open(path, encoding="utf-8").read()
                found += [f"{os.path.relpath(path, REPO_ROOT)}: {m}" for m in SPHINX_ROLE.findall(text)]
    assert found == [], found[:10]
