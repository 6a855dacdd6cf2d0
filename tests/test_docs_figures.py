"""Figures quoted in the docs are the ones their scripts wrote: each table below is compared with the result
file it came from (kept in docs/results/). Regenerate a file with its command, then copy the table."""

import json
import os
import re

from conftest import REPO_ROOT

DOCS = os.path.join(REPO_ROOT, "docs")


def _table_rows(text: str, first_cell: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(f"| {first_cell} |")]


def test_main_job_table_in_results_is_the_runs_comparison():
    """docs/RESULTS.md §1 quotes the main job (`python recipes/text_classification.py --config
    recipes/configs/sst2_minilm_default.yaml`)."""
    source = open(os.path.join(DOCS, "results", "main_job", "comparison.md"), encoding="utf-8").read()
    page = open(os.path.join(DOCS, "RESULTS.md"), encoding="utf-8").read()
    section = page.split("## 1.", 1)[1].split("\n## ", 1)[0]
    for run in ("baseline", "decorr"):
        assert _table_rows(section, run) == _table_rows(source, run), run
    data = json.load(open(os.path.join(DOCS, "results", "main_job", "comparison.json"), encoding="utf-8"))
    assert "sst2_minilm_default.yaml" in data["command"]


def test_overhead_table_in_performance_is_the_benchmarks_output():
    """docs/PERFORMANCE.md quotes `python benchmarks/overhead.py --repeats 9 --steps 3` (docs/results/overhead.json).
    """
    data = json.load(open(os.path.join(DOCS, "results", "overhead.json"), encoding="utf-8"))["variants"]
    page = open(os.path.join(DOCS, "PERFORMANCE.md"), encoding="utf-8").read()
    section = page.split("## At MiniLM scale", 1)[1].split("\n## ", 1)[0]
    rows = {"plain `Trainer`": "plain", "`DecorrTrainer`, last block": "decorr_last",
            "`DecorrTrainer`, all 6 blocks": "decorr_all", "naive `torch.cov` loop, all 6 blocks": "naive_all"}
    for label, key in rows.items():
        [row] = _table_rows(section, label)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].split()[0] == f"{data[key]['time_ratio']:.3f}", label
        assert cells[2].split()[0] == f"{data[key]['memory_ratio']:.3f}", label
    assert f"{data['plain']['median_step_s']:.2f} s" in section


def _numbers(cell: str) -> list[float]:
    return [float(x.replace("−", "-")) for x in re.findall(r"[−-]?\d+\.\d+", cell)]


def test_llm_scale_memory_table_in_performance_is_the_benchmarks_output():
    """docs/PERFORMANCE.md quotes `python benchmarks/llm_scale.py --rounds 2 --json docs/results/llm_scale.json`."""
    data = json.load(open(os.path.join(DOCS, "results", "llm_scale.json"), encoding="utf-8"))
    page = open(os.path.join(DOCS, "PERFORMANCE.md"), encoding="utf-8").read()
    rows = [line for line in page.splitlines() if re.match(r"\| (on|off), (all 4|last) \|", line)]
    assert len(rows) == 8
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        checkpointing, layers = cells[0].split(", ")
        variant = cells[1].strip("*")
        layer_key = "all" if layers == "all 4" else "last"
        [m] = [m for m in data["memory"] if m.get("variant") == variant
               and m["checkpointing"] == (checkpointing == "on") and m["layers"] == layer_key]
        want = [m["kept_MiB"], m["kept_ratio"], m["forward_peak_MiB"], m["forward_peak_ratio"],
                m["backward_peak_ratio"]]
        got = _numbers(cells[2]) + _numbers(cells[3]) + _numbers(cells[4])
        assert got == [abs(round(v, 2)) if round(v, 2) == 0 else round(v, 2) for v in want], row
