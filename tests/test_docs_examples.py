"""Every code block of README.md and docs/**/*.md is checked: the documentation's examples run.

Fenced blocks are collected from the Markdown source and parametrised by page and line, so a
failure names ``docs/how-to/peft.md:L12``. What happens to a block depends on its language and on
an HTML comment on the line before its fence:

* ```` ```python ```` — executed as a script in a fresh subprocess (cwd: a temporary folder that
  links ``recipes/``, ``examples/`` and ``docs/`` of the repository; ``PYTHONPATH`` = the repository;
  offline; a timeout). ``<!-- docs-test: continue -->`` appends the block to the previous Python
  block of the page (the two run as one script); ``<!-- docs-test: skip REASON -->`` (a GPU, the Hub,
  a long run) only compiles it.
* ```` ```bash ```` / ``sh`` / ``console`` — every command is checked without running it: a
  ``python recipes/….py``, ``python -m hf_decorr``, ``hf-decorr``, ``accelerate launch`` or ``torchrun`` line
  runs the script or subcommand with ``--help`` and every ``--option`` of the line must appear in that
  help (and the repository files it names must exist); any other command must start with a word of
  :data:`ALLOWED_COMMANDS`. ``<!-- docs-test: run -->`` executes the block as written instead (for
  cheap commands on tiny data; ``hf-decorr`` and ``python`` are this interpreter's);
  ``<!-- docs-test: skip REASON -->`` (a GPU, the Hub, a long run) documents why a block is never run
  and adds ``bash -n``; its commands are checked as above.
* ```` ```yaml ```` — must parse with ``yaml.safe_load``; ``decorr_*`` keys must be fields of ``DecorrConfig``.
* Any other fence (``text``, ``json``, none) is prose.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import REPO_ROOT

PAGES = ["README.md", "PYPI.md"] + sorted(os.path.relpath(path, REPO_ROOT)
                               for path in glob.glob(os.path.join(REPO_ROOT, "docs", "**", "*.md"), recursive=True))
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session"}
YAML_LANGS = {"yaml", "yml"}
#: first words of shell commands that are only checked for being expected here (never run)
ALLOWED_COMMANDS = {"pip", "pip3", "cd", "export", "source", ".", "mkdir", "ls", "cat", "echo", "git", "tensorboard",
                    "nvidia-smi", "uv", "deactivate", "wait"}
#: ``python -m <module>`` forms that are only checked for being expected here
ALLOWED_MODULES = {"pip", "venv", "pytest"}
#: script names that stand for the reader's own script in launcher examples
PLACEHOLDER_SCRIPTS = {"train.py", "your_script.py", "script.py"}
#: repository folders whose files a command may name; such a path must exist
REPO_PREFIXES = ("recipes/", "examples/", "scripts/", "benchmarks/", "tests/", "docs/", ".ci/")
#: options the recipes take outside their argparse parser, so that their --help does not list them
#: (``--config recipe.yaml`` is split off by hf_decorr.app.parser before HfArgumentParser runs)
RECIPE_OPTIONS_OUTSIDE_HELP = {"config"}
PYTHON_TIMEOUT = 300
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(skip|continue|run)\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")  # indented too: fences inside list items


@dataclasses.dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None = None  # skip, continue, run
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:L{self.line}"


def parse_blocks(page: str, text: str) -> list[Block]:
    """The fenced code blocks of one Markdown page, with the ``docs-test`` marker of each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and set(lines[i].strip()) == {fence[0]}):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        previous = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(previous)
        blocks.append(Block(page, start + 1, lang.lower(), textwrap.dedent("\n".join(body)) + "\n",
                            marker.group(1) if marker else None, marker.group(2) if marker else ""))
    return blocks


def _read(page: str) -> str:
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as f:
        return f.read()


ALL_BLOCKS = [block for page in PAGES for block in parse_blocks(page, _read(page))]


def python_scripts() -> list[Block]:
    """The Python blocks, continuations merged into the block they continue (a skip anywhere skips the chain)."""
    chains: list[Block] = []
    last: dict[str, Block] = {}
    for block in ALL_BLOCKS:
        if block.lang not in PYTHON_LANGS:
            continue
        if block.marker == "continue":
            head = last.get(block.page)
            assert head is not None, f"{block.id}: 'docs-test: continue' with no Python block before it on the page"
            head.code += f"\n# --- continued from {block.id}\n" + block.code
            continue
        head = dataclasses.replace(block)
        chains.append(head)
        last[block.page] = head
    return chains


PYTHON_SCRIPTS = python_scripts()
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]
YAML_BLOCKS = [b for b in ALL_BLOCKS if b.lang in YAML_LANGS]


def _workdir(tmp_path) -> str:
    """A scratch folder that sees the repository's data and scripts under their usual relative paths."""
    for name in ("recipes", "examples", "docs"):
        os.symlink(os.path.join(REPO_ROOT, name), tmp_path / name)
    shims = tmp_path / ".bin"
    shims.mkdir()
    python = shlex.quote(sys.executable)  # scripts, not links: a link would lose the virtual environment
    for name, line in (("python", f'exec {python} "$@"'), ("python3", f'exec {python} "$@"'),
                       ("hf-decorr", f'exec {python} -m hf_decorr "$@"')):
        (shims / name).write_text(f"#!/bin/sh\n{line}\n")
        (shims / name).chmod(0o755)
    return str(tmp_path)


def _env(workdir: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("HF_DECORR_DEBUG", None)
    if workdir is not None:
        env["PATH"] = os.path.join(workdir, ".bin") + os.pathsep + env.get("PATH", "")
    return env


# ------------------------------------------------------------------------------------------------ Python


@pytest.mark.parametrize("block", PYTHON_SCRIPTS, ids=lambda b: b.id)
def test_python_block(block: Block, tmp_path):
    code = compile(block.code, block.id, "exec")  # a syntax error names the page and line
    if block.marker == "skip":
        assert block.reason, f"{block.id}: 'docs-test: skip' needs a reason"
        assert code is not None
        return
    workdir = _workdir(tmp_path)
    script = tmp_path / (re.sub(r"[^\w]+", "_", block.id) + ".py")
    script.write_text(block.code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=workdir, env=_env(workdir), capture_output=True,
                          text=True, timeout=PYTHON_TIMEOUT)
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------------ shell


def _logical_lines(block: Block) -> list[str]:
    """Commands of a shell block: continuation lines joined, console output dropped."""
    raw = block.code.splitlines()
    if block.lang in {"console", "shell-session"}:
        joined, keep = [], False
        for line in raw:
            if line.startswith("$ "):
                joined.append(line[2:])
                keep = line.rstrip().endswith("\\")
            elif keep:
                joined.append(line)
                keep = line.rstrip().endswith("\\")
        raw = joined
    text = "\n".join(raw).replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _commands(line: str) -> list[list[str]]:
    """The simple commands of one line (split at ``&&``, ``||``, ``;``, ``|``), comments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


@functools.cache
def _help(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _check_options(tokens: list[str], help_text: str, what: str, extra: frozenset[str] = frozenset()) -> None:
    for token in tokens:
        if not token.startswith("--") or token == "--":
            continue
        name = token.split("=", 1)[0][2:]
        if name in extra:
            continue
        variants = {name, name.replace("_", "-"), name.replace("-", "_")}
        assert any(re.search(rf"(?<![\w-])--{re.escape(v)}(?![\w-])", help_text) for v in variants), (
            f"{what} has no option --{name} (not in its --help)")


def _check_paths(tokens: list[str], what: str) -> None:
    for token in tokens:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if value.startswith(REPO_PREFIXES) and not any(c in value for c in "*?<>$") and "..." not in value:
            assert os.path.exists(os.path.join(REPO_ROOT, value)), f"{what} names {value}, which does not exist"


def _check_script(tokens: list[str], what: str) -> None:
    """``script.py [options]``: the script exists, and its --help lists every option given."""
    script, rest = tokens[0], tokens[1:]
    if os.path.basename(script) in PLACEHOLDER_SCRIPTS and not os.path.exists(os.path.join(REPO_ROOT, script)):
        return  # the reader's own script
    assert os.path.isfile(os.path.join(REPO_ROOT, script)), f"{what}: no script {script} in the repository"
    _check_paths(rest, what)
    if any(t.startswith("--") for t in rest):
        extra = frozenset(RECIPE_OPTIONS_OUTSIDE_HELP) if script.startswith("recipes/") else frozenset()
        _check_options(rest, _help(script), f"{what}: {script}", extra)


def _check_hf_decorr(args: list[str], what: str) -> None:
    from hf_decorr.app.commands import COMMANDS

    if not args or args[0] in {"--help", "-h", "--version"}:
        return
    assert args[0] in COMMANDS, f"{what}: hf-decorr has no command {args[0]!r} (it has {sorted(COMMANDS)})"
    _check_paths(args[1:], what)
    _check_options(args[1:], _help("-m", "hf_decorr", args[0]), f"{what}: hf-decorr {args[0]}")


def _check_launcher(args: list[str], module: str, what: str) -> None:
    """``accelerate launch`` / ``torchrun``: the launcher's options, then the script's."""
    at = next((i for i, t in enumerate(args) if t.endswith(".py")), None)
    assert at is not None, f"{what}: no script.py in the launcher's command"
    _check_paths(args[:at], what)
    _check_options(args[:at], _help("-m", module), f"{what}: {module}")
    _check_script(args[at:], what)


def _check_command(tokens: list[str], what: str) -> None:
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value command
        tokens = tokens[1:]
    if tokens[:1] == ["nice"]:
        tokens = tokens[3:] if tokens[1:2] == ["-n"] else tokens[1:]
    if tokens[:1] == ["time"]:
        tokens = tokens[1:]
    if not tokens:
        return
    word = tokens[0]
    if word in {"python", "python3"}:
        if tokens[1:2] == ["-m"]:
            module = tokens[2] if len(tokens) > 2 else ""
            if module == "hf_decorr":
                return _check_hf_decorr(tokens[3:], what)
            if module == "pytest":
                _check_paths([t.split("::")[0] for t in tokens[3:]], what)
            assert module in ALLOWED_MODULES, f"{what}: python -m {module} is not an expected command"
            return
        assert len(tokens) > 1 and tokens[1].endswith(".py"), f"{what}: expected `python script.py`: {tokens}"
        return _check_script(tokens[1:], what)
    if word == "hf-decorr":
        return _check_hf_decorr(tokens[1:], what)
    if word == "accelerate":
        assert tokens[1:2] == ["launch"], f"{what}: only `accelerate launch` is checked: {tokens}"
        return _check_launcher(tokens[2:], "accelerate.commands.launch", what)
    if word == "torchrun":
        return _check_launcher(tokens[1:], "torch.distributed.run", what)
    if word == "bash":
        _check_paths(tokens[1:], what)
        assert len(tokens) > 1 and os.path.isfile(os.path.join(REPO_ROOT, tokens[1])), f"{what}: no {tokens[1:]}"
        return
    if word.startswith((".venv/", "./")):  # .venv/bin/python & co.
        return _check_command([os.path.basename(word), *tokens[1:]], what)
    assert word in ALLOWED_COMMANDS, (
        f"{what}: `{word}` is not a command this test knows; add it to ALLOWED_COMMANDS in "
        "tests/test_docs_examples.py, or use a ```text fence for a block that is not a command")


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_block(block: Block, tmp_path):
    if block.marker == "skip":  # never run: the syntax, then the same checks as an unmarked block
        assert block.reason, f"{block.id}: 'docs-test: skip' needs a reason"
        proc = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
        assert proc.returncode == 0, f"{block.id}: {proc.stderr}"
    if block.marker == "run":
        workdir = _workdir(tmp_path)
        code = block.code if block.lang not in {"console", "shell-session"} else "\n".join(_logical_lines(block))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workdir, env=_env(workdir),
                              capture_output=True, text=True, timeout=PYTHON_TIMEOUT)
        assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return
    for line in _logical_lines(block):
        what = f"{block.id} ({line.strip()[:60]}…)" if len(line.strip()) > 60 else f"{block.id} ({line.strip()})"
        for tokens in _commands(line):
            _check_command(tokens, what)


# ------------------------------------------------------------------------------------------------ YAML


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda b: b.id)
def test_yaml_block(block: Block):
    if block.marker == "skip":
        return
    data = yaml.safe_load(block.code)
    if isinstance(data, dict):
        from hf_decorr import DecorrConfig

        fields = {f.name for f in dataclasses.fields(DecorrConfig)}
        unknown = sorted(k for k in data if isinstance(k, str) and k.startswith("decorr_") and k not in fields)
        assert not unknown, f"{block.id}: {unknown} are not DecorrConfig fields"


# ------------------------------------------------------------------------------------------------ the front page


def test_readme_front_page():
    """The README stays a front page, and keeps the two commands CI and the reader rely on."""
    text = _read("README.md")
    assert len(text.splitlines()) <= 150
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert "python recipes/text_classification.py --config recipes/configs/sst2_minilm_default.yaml" in section
    assert "bash .ci/run" in section and "python -m pytest -q" in section
    with open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "python -m pytest -q" in f.read()  # the command the README gives is the one CI runs


def test_markers_are_well_formed_and_used_where_they_mean_something():
    """A misspelt marker, or one on a block it does nothing for, would silently change what is checked."""
    problems = []
    for page in PAGES:
        for number, line in enumerate(_read(page).splitlines(), start=1):
            if "docs-test" in line and not MARKER.match(line):
                problems.append(f"{page}:L{number}: not a docs-test marker: {line.strip()}")
    for block in ALL_BLOCKS:
        if block.marker == "continue" and block.lang not in PYTHON_LANGS:
            problems.append(f"{block.id}: 'continue' is for Python blocks")
        if block.marker == "run" and block.lang not in SHELL_LANGS:
            problems.append(f"{block.id}: 'run' is for shell blocks (Python blocks always run)")
        if block.marker == "skip" and not block.reason:
            problems.append(f"{block.id}: 'skip' needs a reason")
    assert problems == []


def test_collector_sees_markers_and_continuations():
    page = ("x\n<!-- docs-test: skip needs a GPU -->\n```python\nimport torch\n```\n\n```bash\nls\n```\n"
            "<!-- docs-test: continue -->\n\n```python\nx = 1\n```\n  ```yaml\n  a: 1\n  ```\n"
            "- item\n\n    ````bash\n    ```\n    ````\n")
    blocks = parse_blocks("page.md", page)
    assert [(b.lang, b.line, b.marker, b.reason) for b in blocks] == [
        ("python", 3, "skip", "needs a GPU"), ("bash", 7, None, ""), ("python", 12, "continue", ""),
        ("yaml", 15, None, ""), ("bash", 20, None, "")]
    assert blocks[3].code == "a: 1\n" and blocks[4].code == "```\n"  # a longer fence holds a shorter one
    assert _commands("a && b --x 1 | c # comment") == [["a"], ["b", "--x", "1"], ["c"]]
    assert len(PYTHON_SCRIPTS) >= 10 and len(SHELL_BLOCKS) >= 5  # the docs hold runnable examples
