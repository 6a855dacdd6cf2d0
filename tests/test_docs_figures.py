"""Figures quoted in the docs are the ones their scripts wrote: each table below is compared with the result
file it came from (kept in docs/results/). Regenerate a file with its command, then copy the table."""

import json
import os
import re

from conftest import REPO_ROOT, markdown_tables, printed

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


def _study():
    import sys

    sys.path.insert(0, os.path.join(REPO_ROOT, "recipes"))
    import penalty_study

    return penalty_study


def test_penalty_study_report_is_the_scripts_output_of_its_cells(monkeypatch):
    """docs/study/study.{json,md} are what `python recipes/penalty_study.py --output_dir docs/study` writes
    from the committed cells (docs/study/cells) and calibration: rebuilt here without training."""
    study = _study()
    monkeypatch.chdir(REPO_ROOT)
    args = study.parse(["--output_dir", "docs/study"])
    cells_dir = os.path.join("docs", "study", "cells")
    results = [json.load(open(os.path.join(cells_dir, name), encoding="utf-8")) for name in os.listdir(cells_dir)]
    # the whole grid: every penalty at every size, with the seeds the options give
    want = {f"{size}_{seed}_{p}.json" for size in args.sizes for seed in study.seeds_for(args, size)
            for p in args.penalties}
    assert set(os.listdir(cells_dir)) == want
    committed = json.load(open(os.path.join("docs", "study", "study.json"), encoding="utf-8"))
    summary = study.summarise(args, results)
    summary["figures"] = committed["figures"]
    assert json.loads(json.dumps(summary)) == committed
    assert study.markdown(summary, args) == open(os.path.join("docs", "study", "study.md"), encoding="utf-8").read()
    for figure in committed["figures"]:
        with open(os.path.join("docs", "study", figure["path"]), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", figure


def _sections(text: str) -> dict[str, set[str]]:
    """The lines under each `### <metric> …` heading of a page (a metric may head several sections)."""
    parts = re.split(r"^### ([\w.]+).*$", text, flags=re.M)
    out: dict[str, set[str]] = {}
    for metric, body in zip(parts[1::2], parts[2::2]):
        out.setdefault(metric, set()).update(line.strip() for line in body.split("\n## ", 1)[0].splitlines())
    return out


def test_choosing_a_penalty_quotes_the_study():
    """Every table row of the guide is a row of docs/study/study.md under the same metric, and every
    `mean ± std` figure of its text is one of study.md's."""
    study = open(os.path.join(DOCS, "study", "study.md"), encoding="utf-8").read()
    page = open(os.path.join(DOCS, "choosing-lambda.md"), encoding="utf-8").read()
    source, quoted = _sections(study), _sections(page)
    checked = 0
    for metric, lines in quoted.items():
        for line in lines:
            if re.match(r"\| (none|cov_l1|cov_l1_x3|decov|vicreg|l1) \|", line):
                assert line in source[metric], (metric, line)
                checked += 1
    assert checked >= 5 * 3 * 2, checked  # five penalties in at least three tables of two kinds
    for figure in re.findall(r"[+\-−]?\d+\.\d+ ± \d+\.\d+", page):
        assert figure.replace("−", "-") in study, figure


def test_readme_and_guide_quote_the_studys_int4_range():
    """The int4 per-tensor loss range of the README and the guide: the smallest and largest mean paired loss
    of any penalty at any training size in docs/study/study.json."""
    data = json.load(open(os.path.join(DOCS, "study", "study.json"), encoding="utf-8"))
    means = [-100 * c["mean"] for by_size in data["paired"]["int4_tensor_accuracy"].values()
             for c in by_size.values()]
    quoted = f"{min(means):.1f}–{max(means):.1f}"
    assert min(means) > 0 and data["cells"] == 96
    assert quoted in open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    assert quoted in open(os.path.join(DOCS, "choosing-lambda.md"), encoding="utf-8").read()


def _performance_section(title: str) -> str:
    page = open(os.path.join(DOCS, "PERFORMANCE.md"), encoding="utf-8").read()
    return page.split(title, 1)[1].split("\n## ", 1)[0]


def test_precision_and_subsampling_tables_in_performance_are_the_benchmarks_output():
    """docs/PERFORMANCE.md quotes `python benchmarks/llm_scale.py --precision-table --subsample-table --json
    docs/results/llm_precision.json`."""
    data = json.load(open(os.path.join(DOCS, "results", "llm_precision.json"), encoding="utf-8"))
    section = _performance_section("## Precision of the Gram")
    rows = [line for line in section.splitlines() if re.match(r"\| (MiniLM layer \d|synthetic)", line)]
    assert len(rows) == 7
    for row in rows:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        for precision, cell in zip(("fp32", "tf32", "bf16"), cells[1:]):
            [m] = [m for m in data["precision"]
                   if m["states"] == cells[0].replace(",", "") and m["precision"] == precision]
            value, grad = (c.strip().strip("*") for c in cell.split("/"))
            assert printed(value, m["value_rel_err"]) and printed(grad, m["grad_rel_err"]), (cells[0], precision)
    section = _performance_section("## Subsampling")
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \| [+−-]", line)]
    assert len(rows) >= 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        [m] = [m for m in data["subsample"] if m["max_samples"] == int(cells[0])]
        low, high = cells[2].replace("%", "").split(" … ")
        assert printed(cells[1].rstrip("%"), 100 * m["bias_mean"]), row
        assert printed(low, 100 * m["bias_min"]) and printed(high, 100 * m["bias_max"]), row
        assert printed(cells[3], m["grad_cosine_drawn_rows"]), row



def test_kernel_memory_table_in_performance_is_the_benchmarks_output():
    """docs/PERFORMANCE.md quotes `python benchmarks/llm_scale.py --kernel-table --json docs/results/llm_kernel.json`.
    """
    data = json.load(open(os.path.join(DOCS, "results", "llm_kernel.json"), encoding="utf-8"))["kernel"]
    section = _performance_section("### Checked against measurements")
    rows = [line for line in section.splitlines() if re.match(r"\| (\d+|old path, \d+) \| \d+ \|", line)]
    assert len(rows) == 5
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        old = cells[0].startswith("old path")
        n, p = int(cells[0].split()[-1]), int(cells[1])
        if old:
            [m] = [m for m in data if m["variant"] == "old" and (m["N"], m["p"]) == (n, p)]
        else:
            chunk = int(cells[2].split()[0])
            [m] = [m for m in data if m["variant"] == "new" and (m["N"], m["p"], m["chunk"]) == (n, p, chunk)]
        numbers = [re.findall(r"\d+(?:\.\d+)?", c) for c in cells[3:]]
        assert printed(numbers[0][0], m["kept_MiB"]) and printed(numbers[1][0], m["kept_formula_MiB"]), row
        assert printed(numbers[2][0], m["forward_transient_MiB"]), row
        assert printed(numbers[3][0], m["backward_transient_MiB"]), row
        if not old:
            assert printed(numbers[2][1], m["forward_transient_per_Tp"]), row
            assert printed(numbers[3][1], m["backward_transient_per_Tp"]), row


def test_sweep_tables_in_results_are_the_sweeps_output():
    """docs/RESULTS.md §2 quotes `python recipes/sweep_sst2.py --weights 0 1 3 10 --seeds 42 43 44 --threads 1
    --output_dir outputs/sst2_sweep` (its sweep.md and sweep.json are kept in docs/results/sst2_sweep/); every
    column but the machine-dependent train time."""
    folder = os.path.join(DOCS, "results", "sst2_sweep")
    source = open(os.path.join(folder, "sweep.md"), encoding="utf-8").read()
    data = json.load(open(os.path.join(folder, "sweep.json"), encoding="utf-8"))
    page = open(os.path.join(DOCS, "RESULTS.md"), encoding="utf-8").read()
    section = page.split("## 2.", 1)[1].split("\n## ", 1)[0]

    def cells(row: str) -> list[str]:
        return [c.strip() for c in row.strip().strip("|").split("|")]

    train_time = cells(_table_rows(source, "λ")[0]).index("train time (s)")
    for label in ("0 (baseline)", "1 ← chosen on dev", "3", "10"):
        [got], [want] = _table_rows(section, label)[:1], _table_rows(source, label)
        got, want = cells(got), cells(want)
        assert got[:train_time] + got[train_time + 1:] == want[:train_time] + want[train_time + 1:], label
    assert data["chosen_weight"] == 1.0 and "--seeds 42 43 44" in data["command"]
    # the effective-rank table: PCA-UD and the dev-set L_Σ of each layer, mean ± std over the seeds
    for weight in ("0", "1", "3", "10"):
        layers = data["summary"][weight]["layers"]
        want = [f"{layers[f'bert.encoder.layer.{i}'][m][0]:.{d}f} ± {layers[f'bert.encoder.layer.{i}'][m][1]:.{d}f}"
                for m, d in (("pca_ud", 1), ("cov_l1", 4)) for i in (4, 5)]
        rows = [r for r in _table_rows(section, weight) if len(cells(r)) == 5]
        assert [cells(r)[1:] for r in rows] == [want], weight


def test_kernel_time_table_in_performance_is_the_benchmarks_output():
    """docs/PERFORMANCE.md quotes `python benchmarks/llm_scale.py --kernel-time --json
    docs/results/llm_kernel_time.json` (milliseconds and the ratio)."""
    data = json.load(open(os.path.join(DOCS, "results", "llm_kernel_time.json"), encoding="utf-8"))["kernel_time"]
    page = open(os.path.join(DOCS, "PERFORMANCE.md"), encoding="utf-8").read()
    rows = [line for line in page.splitlines() if re.match(r"\| \d+ \| \d+ \| (float32|bfloat16) \|", line)]
    assert len(rows) == len(data) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        [m] = [m for m in data if (m["N"], m["p"], m["dtype"]) == (int(cells[0]), int(cells[1]), cells[2])]
        assert printed(cells[3].split()[0], 1000 * m["old_s"]) and printed(cells[4].split()[0], 1000 * m["new_s"])
        assert printed(cells[5], m["new/old"]), row


def test_layer_tables_in_results_are_the_commands_output():
    """docs/RESULTS.md §6 quotes `hf-decorr compare` and `hf-decorr ablate` on the main job's two models (their
    compare.md and ablation.md are kept in docs/results/main_job_layers/)."""
    folder = os.path.join(DOCS, "results", "main_job_layers")
    page = open(os.path.join(DOCS, "RESULTS.md"), encoding="utf-8").read()
    section = page.split("## 6.", 1)[1].split("\n## ", 1)[0]
    compare = open(os.path.join(folder, "compare.md"), encoding="utf-8").read()
    ablation = open(os.path.join(folder, "ablation.md"), encoding="utf-8").read()
    def rows(text: str, first: str, layer: bool) -> list[str]:  # the layer table's rows name a `bert…` module
        return [r for r in _table_rows(text, first) if ("`bert." in r) == layer]

    for i in range(6):
        assert rows(section, str(i), True) == rows(compare, str(i), True) != [], i
    data = json.load(open(os.path.join(folder, "ablation.json"), encoding="utf-8"))
    ks = sorted({int(k) for k in re.findall(r"^\| (\d+) \| 0\.", ablation, flags=re.M)})
    assert 384 in ks and 8 in ks and data
    for k in ks:
        assert rows(section, str(k), False) == rows(ablation, str(k), False) != [], k


def test_llm_step_times_in_performance_are_the_benchmarks_output():
    """docs/PERFORMANCE.md's idle-machine step times quote the `time` entry of docs/results/llm_scale.json (the
    same `python benchmarks/llm_scale.py --rounds 2` run as the memory table)."""
    data = json.load(open(os.path.join(DOCS, "results", "llm_scale.json"), encoding="utf-8"))["time"]
    section = _performance_section("### Time (CPU, float32)")
    quoted = re.search(r"plain ([\d.]+) s \(([\d.]+)×\), old\s+path ([\d.]+) s \(([\d.]+)×\), new path ([\d.]+) s "
                       r"\(([\d.]+)×\)", section.split("docs/results/llm_scale.json", 1)[1])
    assert quoted, "the step-time sentence after the llm_scale.json command"
    for i, variant in enumerate(("plain", "old", "new")):
        assert printed(quoted[2 * i + 1], data[variant]["seconds"]), variant
        assert printed(quoted[2 * i + 2], data[variant]["ratio"]), variant
    memory = json.load(open(os.path.join(DOCS, "results", "llm_scale.json"), encoding="utf-8"))["memory"]
    [new] = [m for m in memory if m["variant"] == "new" and m["checkpointing"] and m["layers"] == "all"]
    kept, rise = re.search(r"kept ([\d.]+)×, forward peak rise ([−\d.]+)×", section).groups()
    assert printed(kept, new["kept_ratio"]) and printed(rise, new["forward_peak_ratio"])


def test_penalty_magnitude_in_results_is_the_sweeps_logs():
    """docs/RESULTS.md §3 quotes the logged L_Σ and task loss of the sweep's runs (each run's results.json is kept
    in docs/results/sst2_sweep/runs/)."""
    import statistics

    folder = os.path.join(DOCS, "results", "sst2_sweep", "runs")

    def runs(weight: str) -> list[dict]:
        return [json.load(open(os.path.join(folder, f"lambda{weight}_seed{s}.json"), encoding="utf-8"))
                for s in (42, 43, 44)]

    page = open(os.path.join(DOCS, "RESULTS.md"), encoding="utf-8").read()
    section = page.split("## 3.", 1)[1].split("\n## ", 1)[0]
    base = runs("0")
    assert all(r["decorr_weight"] == 0.0 and len(r["decorr_loss_log"]) == 9 for r in base)
    [penalty] = [r for r in section.splitlines() if r.startswith("| L_Σ,")]
    [task] = _table_rows(section, "task loss")
    got = re.findall(r"\d+\.\d+", penalty) + re.findall(r"\d+\.\d+", task)
    mean = statistics.fmean
    want = [mean(r["decorr_loss_log"][0] for r in base), mean(r["decorr_loss_log"][-1] for r in base),
            mean(max(r["decorr_loss_log"]) for r in base),
            mean(r["task_loss_log"][0] for r in base), mean(r["task_loss_log"][-1] for r in base)]
    assert len(got) == 5 and all(printed(g, w) for g, w in zip(got, want)), (got, want)
    text = " ".join(section.split())
    for weight in ("1", "3", "10"):
        shares = [[float(weight) * d / t for d, t in zip(r["decorr_loss_log"], r["task_loss_log"])]
                  for r in runs(weight)]
        quoted = re.search(rf"([\d.]+)% at λ = {weight} \(([\d.]+)% in the first window, ([\d.]+)% in the last\)|"
                           rf"([\d.]+)% at λ = {weight} \(([\d.]+)% first, ([\d.]+)% last\)", text)
        assert quoted, weight
        values = [v for v in quoted.groups() if v is not None]
        want = [100 * mean(mean(s) for s in shares), 100 * mean(s[0] for s in shares),
                100 * mean(s[-1] for s in shares)]
        assert all(printed(v, w) for v, w in zip(values, want)), (weight, values, want)


def test_sentence_embedding_tables_in_results_are_the_recipes_output():
    """docs/RESULTS.md §7 quotes the merged three-seed run of recipes/sentence_embeddings.py (its accuracy_vs_k.md
    and results.json are kept in docs/results/sentence_embeddings/): the tables verbatim, the differences and the
    embedding metrics in the text, the CPU time per configuration."""
    import statistics

    folder = os.path.join(DOCS, "results", "sentence_embeddings")
    source = open(os.path.join(folder, "accuracy_vs_k.md"), encoding="utf-8").read()
    data = json.load(open(os.path.join(folder, "results.json"), encoding="utf-8"))
    page = open(os.path.join(DOCS, "RESULTS.md"), encoding="utf-8").read()
    section = page.split("## 7.", 1)[1].split("\n## ", 1)[0]
    tables = markdown_tables(source)
    assert len(tables) == 2 and all(t in section for t in tables)
    assert sorted({r["seed"] for r in data["runs"]}) == [0, 1, 2] and len(data["runs"]) == 12
    text = " ".join(section.split())
    acc = {label: {int(k): 100 * v["test_mean"] for k, v in row.items()} for label, row in data["summary"].items()}
    base, pen = acc["baseline, top-k units by variance"], acc["penalty, top-k units by variance"]
    pca, mat, both = (acc["baseline + PCA (first k components)"], acc["Matryoshka, first k"],
                      acc["penalty + Matryoshka, first k"])

    def quoted(pattern: str) -> list[str]:
        match = re.search(pattern, text)
        assert match, pattern
        return [g for g in match.groups()]

    number = r"([−+]?\d+\.\d)"
    three = number + ", " + number + " and " + number
    checks = [
        (three + r" points at k = 8, 16 and 32, each within", [pen[k] - base[k] for k in (8, 16, 32)]),
        (r"\(" + number + "–" + number + r"% from k = 8 to 64\)", [min(pca[k] for k in (8, 16, 32, 64)),
                                                                   max(pca[k] for k in (8, 16, 32, 64))]),
        (r"top-k units are " + three + " points below it", [pca[k] - base[k] for k in (8, 16, 32)]),
        (r"penalised embedding's " + three + r"\.", [pca[k] - pen[k] for k in (8, 16, 32)]),
        (r"changes little \(" + three + " points", [both[k] - mat[k] for k in (8, 16, 32)]),
    ]
    for pattern, want in checks:
        got = quoted(pattern)
        assert len(got) == len(want) and all(printed(g, w) for g, w in zip(got, want)), (pattern, got, want)

    def mean(config: str, key: str) -> float:
        return statistics.fmean(r["eval"][key] for r in data["runs"] if r["config"] == config)

    penalised = [r for r in data["runs"] if r["config"] == "penalty"]
    got = quoted(r"L_Σ (\d\.\d+)·10⁻⁴ \(baseline\) → (\d\.\d+)·10⁻⁶ \(penalty, (\d+)× lower; the logged training "
                 r"L_Σ of the penalised runs fell from (\d\.\d+)·10⁻⁴ to (\d\.\d+)·10⁻⁵\), but MAPC \*rose\* "
                 r"(\d\.\d+) → (\d\.\d+), UD_90% fell (\d+\.\d) → (\d+\.\d) and PCA-UD (\d+\.\d) → (\d+\.\d)")
    want = [1e4 * mean("baseline", "eval_decorr_cov_l1"), 1e6 * mean("penalty", "eval_decorr_cov_l1"),
            mean("baseline", "eval_decorr_cov_l1") / mean("penalty", "eval_decorr_cov_l1"),
            1e4 * statistics.fmean(r["first_decorr_loss"] for r in penalised),
            1e5 * statistics.fmean(r["last_decorr_loss"] for r in penalised),
            mean("baseline", "eval_decorr_mapc"), mean("penalty", "eval_decorr_mapc"),
            mean("baseline", "eval_decorr_ud"), mean("penalty", "eval_decorr_ud"),
            mean("baseline", "eval_decorr_pca_ud"), mean("penalty", "eval_decorr_pca_ud")]
    assert all(printed(g, w) for g, w in zip(got, want)), (got, want)
    low, high = quoted(r"took (\d+\.\d)–(\d+\.\d) s of CPU time")
    cpu = [r["cpu_seconds"] for r in data["runs"]]
    assert printed(low, min(cpu)) and printed(high, max(cpu))
