"""pyproject.toml against .ci/lower-bounds.txt: the declared lower bounds are the tested versions.

.ci/run installs the pins of .ci/lower-bounds.txt in its lower-bound run; these checks keep the pins and
the ``>=`` bounds of pyproject.toml equal, so that a bound cannot be changed without being tested.
"""

import os
import re
import tomllib

from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = os.path.join(REPO_ROOT, "pyproject.toml")
LOWER_BOUNDS = os.path.join(REPO_ROOT, ".ci", "lower-bounds.txt")
COMPATIBILITY = os.path.join(REPO_ROOT, "docs", "COMPATIBILITY.md")

#: the extras whose lower bounds are tested (the others, plots / paper / tests, are tools of this repository)
TESTED_EXTRAS = ("trl", "peft", "sentence-transformers", "setfit")
#: pinned to the one version tested rather than to pyproject's bound (the CPU wheel installed here)
TORCH = "torch"


def _project() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]


def _pins() -> dict[str, Version]:
    pins = {}
    with open(LOWER_BOUNDS, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.extras and req.marker is None, line
            name = canonicalize_name(req.name)
            assert name not in pins, f"{req.name} is pinned twice"
            pins[name] = Version(spec.version)
    return pins


def _lower_bound(req: Requirement) -> Version:
    bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{req} must have exactly one >= lower bound"
    return bounds[0]


def _tested_requirements() -> list[Requirement]:
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in TESTED_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def test_every_lower_bound_is_pinned_to_itself():
    pins = _pins()
    declared = {}
    for req in _tested_requirements():
        name = canonicalize_name(req.name)
        bound = _lower_bound(req)
        assert declared.setdefault(name, bound) == bound, f"{req.name} has two different lower bounds"
        assert name in pins, f"{req.name}>={bound} is not pinned in .ci/lower-bounds.txt, so it is never tested"
        assert pins[name] == bound, (f"pyproject.toml says {req.name}>={bound}, .ci/lower-bounds.txt tests "
                                     f"{req.name}=={pins[name]}: change both together")
    extra = set(pins) - set(declared)
    assert not extra, f".ci/lower-bounds.txt pins {sorted(extra)}, which pyproject.toml does not bound"


def test_the_torch_pin_is_admitted():
    (torch,) = [r for r in _tested_requirements() if canonicalize_name(r.name) == TORCH]
    assert _pins()[TORCH] in torch.specifier


def test_a_package_named_twice_has_one_specifier():
    """The tests extra repeats the extras' requirements: they must not disagree."""
    project = _project()
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    seen: dict[str, SpecifierSet] = {}
    for group in groups:
        for req in map(Requirement, group):
            name = canonicalize_name(req.name)
            assert seen.setdefault(name, req.specifier) == req.specifier, (
                f"{req.name}: {seen[name]} in one place, {req.specifier} in another")


def test_python_floor_matches_ruff_and_the_compatibility_table():
    with open(PYPROJECT, "rb") as f:
        pyproject = tomllib.load(f)
    (spec,) = SpecifierSet(pyproject["project"]["requires-python"])
    assert spec.operator == ">="
    major, minor = Version(spec.version).release[:2]
    assert pyproject["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    rows = _compatibility_rows()
    assert rows["python"][0] == f"{major}.{minor}"


def _compatibility_rows() -> dict[str, tuple[str, str]]:
    """``{package: (lowest, highest)}`` from the table of docs/COMPATIBILITY.md."""
    rows = {}
    with open(COMPATIBILITY, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and re.fullmatch(r"\d+(\.\d+)*(\+\w+)?", cells[1]):
                rows[canonicalize_name(cells[0])] = (cells[1], cells[2])
    return rows


def test_the_compatibility_table_shows_the_tested_lower_bounds():
    rows = _compatibility_rows()
    for name, pin in _pins().items():
        assert name in rows, f"docs/COMPATIBILITY.md has no row for {name}"
        assert Version(rows[name][0]) == pin, f"docs/COMPATIBILITY.md: lowest {name} is {rows[name][0]}, tested {pin}"
        assert Version(rows[name][1]) >= pin


def test_the_package_is_marked_typed():
    """py.typed ships (package data), so users' type checkers read the annotations; .ci/run runs mypy on them and
    checks that the wheel holds the marker (scripts/wheel_smoke.py)."""
    assert os.path.exists(os.path.join(REPO_ROOT, "hf_decorr", "py.typed"))
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["hf_decorr"]
    assert pyproject["tool"]["mypy"]["files"] == ["hf_decorr"]


def test_the_package_index_page_has_no_link_that_would_break_there():
    """PyPI shows PYPI.md (``readme``): a link into this repository (``docs/...``) has nothing to point to there."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["readme"] == "PYPI.md"
    assert "Typing :: Typed" in project["classifiers"] and project["keywords"]
    text = open(os.path.join(REPO_ROOT, "PYPI.md"), encoding="utf-8").read()
    targets = re.findall(r"\]\(([^)]*)\)", text)
    assert all(t.startswith(("https://", "http://")) for t in targets), targets
    with open(os.path.join(REPO_ROOT, "MANIFEST.in"), encoding="utf-8") as f:
        assert "graft docs" in f.read()  # the documentation PYPI.md mentions is in the source distribution
