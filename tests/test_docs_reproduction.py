"""docs/REPRODUCTION.md quotes the paper recipes' runs: each run's results.md and results.json (without per-epoch
histories) are kept in docs/results/paper/<experiment>/. The page's tables must be those files' tables verbatim,
and the numbers in its prose must be the files' values at the digits printed. Re-run a recipe with the command on
the page, copy its results.md and results.json there, then the tables."""

import json
import os
import re
import statistics

import pytest
from conftest import REPO_ROOT, markdown_tables, printed

DOCS = os.path.join(REPO_ROOT, "docs")
N = r"(\d+(?:\.\d+)?)"  # a number as printed (a full stop after it is not part of it)
E = r"(\d+(?:\.\d+)?e\d+)"  # the same in e-notation
KEPT = os.path.join(DOCS, "results", "paper")


def _page() -> str:
    return open(os.path.join(DOCS, "REPRODUCTION.md"), encoding="utf-8").read()


def _section(number: str) -> str:
    return _page().split(f"\n## {number}", 1)[1].split("\n## ", 1)[0]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _kept(experiment: str) -> tuple[str, dict]:
    folder = os.path.join(KEPT, experiment)
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        data = json.load(f)
    return open(os.path.join(folder, "results.md"), encoding="utf-8").read(), data


def _find(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    assert match, f"the page no longer says {pattern!r}"
    return match.groups()


@pytest.mark.parametrize(
    "section, experiment, headers",
    [
        ("1.", "dimensionality", ["| regulariser", "| λ |"]),
        ("2.", "xor", ["| condition |", "| rule |"]),
        ("3.", "image_autoencoder", ["| regulariser", "| regulariser"]),
    ],
)
def test_reproduction_tables_are_the_runs_tables(section, experiment, headers):
    source, _ = _kept(experiment)
    text = _section(section)
    tables = markdown_tables(source)
    used = 0
    for header in headers:
        table = [t for t in tables if t.startswith(header)][headers[:used].count(header)]
        assert table in text, f"{experiment}: the table with row {table.splitlines()[2]!r} is not on the page as is"
        used += 1


def test_reproduction_experiment_1_prose_is_the_runs_values():
    _, data = _kept("dimensionality")
    _, long = _kept("dimensionality_80ep")
    text = _flat(_section("1."))
    summary = {(s["penalty"], s["weight"]): s for s in data["summary"]}
    claim = data["claim"]
    best = claim["recommended_weight"]
    assert _find(r"That is \*\*λ = " + N + r"\*\*", text)[0] == f"{best:.3g}"
    # the recommended λ's TdV per draw, in draw order
    quoted = _find(r"TdV per draw ([\d., ]+)\)", text)[0].split(", ")
    tdv = [r["tdv"] for r in sorted(data["runs"], key=lambda r: r["draw"]) if r["penalty"] == "cov_l1"
           and r["weight"] == best]
    assert len(quoted) == len(tdv) == 10 and all(printed(q, v) for q, v in zip(quoted, tdv))
    # the MSE ratio test
    none_mse, ratio_best, ratio_min = _find(
        r"exactly \(MSE ([\d.e-]+), float32 round-off\), so the ratio is " + E + r" at λ = [\d.]+ "
        r"and ≥ " + E, text)
    assert printed(none_mse, summary[("none", 0.0)]["mse_mean"])
    ratios = {w["weight"]: w["mse_ratio_of_means"] for w in claim["per_weight"]}
    assert printed(ratio_best, ratios[best]) and printed(ratio_min, min(ratios.values()))
    mse, rel = _find(r"the cost is tiny \(([\d.e-]+), i.e. ([\d.e-]+) of the mean", text)
    assert printed(mse, summary[("cov_l1", best)]["mse_mean"])
    assert printed(rel, summary[("cov_l1", best)]["rel_mse_mean"])
    assert printed(_find(r"training \(([\d.e-]+) at λ = 1 after 80 epochs", text)[0],
                    {(s["penalty"], s["weight"]): s for s in long["summary"]}[("cov_l1", 1.0)]["mse_mean"])
    # L1 at equal MSE
    l1 = claim["l1_comparison"]
    values = _find(r"gives TdV " + N + r" vs " + N + r" and CVR " + N + r" vs " + N + r"", text)
    want = (l1["tdv_l1_at_equal_mse"], l1["tdv_cov_l1"], l1["cvr_l1_at_equal_mse"], l1["cvr_cov_l1"])
    assert all(printed(v, w) for v, w in zip(values, want)) and l1["l1_worse"]
    low, high = _find(r"MAPC among active units " + N + r"–" + N + r" across the grid", text)
    l1_active = [s["mapc_active_mean"] for s in data["summary"] if s["penalty"] == "l1"]
    assert printed(low, min(l1_active)) and printed(high, max(l1_active))
    # convergence over the last quarter
    median, largest, changed, runs = _find(
        r"TdV moved by " + N + r" \(median\) and at most " + N + r", and UD_90% changed in (\d+) of (\d+) runs", text)
    moves = [abs(r["last_quarter_dtdv"]) for r in data["runs"]]
    assert printed(median, statistics.median(moves)) and printed(largest, max(moves))
    assert (int(changed), int(runs)) == (sum(r["last_quarter_ud_changed"] for r in data["runs"]), len(data["runs"]))
    # plain MAPC against MAPC among the active units at λ = 1
    plain0, plain1, active1 = _find(r"barely falls \(" + N + r" → " + N + r" at λ = 1\).*?falls to " + N + r"\.", text)
    assert printed(plain0, summary[("none", 0.0)]["mapc_mean"])
    assert printed(plain1, summary[("cov_l1", 1.0)]["mapc_mean"])
    assert printed(active1, summary[("cov_l1", 1.0)]["mapc_active_mean"])


def test_reproduction_80_epoch_check_is_the_runs_values():
    _, short = _kept("dimensionality")
    _, long = _kept("dimensionality_80ep")
    assert long["settings"]["epochs"] == 80 and long["settings"]["num_draws"] == 2
    text = _section("1.")
    rows = [r for r in text.splitlines() if re.match(r"\| [\d.]+ \| [\d.e-]+ / ", r)]
    assert len(rows) == 5
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for data, cell in ((short, cells[1]), (long, cells[2])):
            [run] = [r for r in data["runs"] if r["draw"] == 0 and r["penalty"] == "cov_l1"
                     and f"{r['weight']:.3g}" == cells[0]]
            mse, tdv, ud, cvr = cell.split(" / ")
            assert printed(mse, run["mse"]) and printed(tdv, run["tdv"]) and printed(cvr, run["cvr"]), row
            assert int(ud) == run["ud"], row
    flat = _flat(text)
    summary = {(s["penalty"], s["weight"]): s for s in long["summary"]}
    quoted = {"cov_l1": _find(r"L_Σ's mean CVR settling at " + N + r"–" + N + r" for λ ≥ 0.05", flat),
              "l1": _find(r"while L1's stays at " + N + r"–" + N + r"", flat)}
    for penalty, (low, high) in quoted.items():
        cvr = [s["cvr_mean"] for (p, w), s in summary.items() if p == penalty and w >= 0.05]
        assert printed(low, min(cvr)) and printed(high, max(cvr)), penalty
    claim = long["claim"]
    assert _find(r"the claim already holds from λ = " + N + r" \((\d)/2 draws\)", flat) == (
        f"{claim['recommended_weight']:.3g}", str(claim["at_recommended"]["draws_passing"]))
    l1 = claim["l1_comparison"]
    values = _find(r"L1 is still worse at equal MSE \(TdV " + N + " vs " + N + ", CVR " + N + " vs " + N + r"\)", flat)
    want = (l1["tdv_l1_at_equal_mse"], l1["tdv_cov_l1"], l1["cvr_l1_at_equal_mse"], l1["cvr_cov_l1"])
    assert all(printed(v, w) for v, w in zip(values, want))
    assert printed(_find(r"2× MSE test still fails \(" + E + r"×\)", flat)[0],
                    claim["at_recommended"]["mse_ratio_of_means"])


def test_reproduction_experiment_3_prose_is_the_runs_values():
    _, data = _kept("image_autoencoder")
    summary = {(s["penalty"], s["weight"]): s for s in data["summary"]}
    base = summary[("none", 0.0)]["mse_mean"]

    def change(penalty, weight):
        return 100 * (summary[(penalty, weight)]["mse_mean"] / base - 1)

    text = _flat(_section("3."))
    assert printed(_find(r"MSE cost \(([+\d.]+)%, well within", text)[0], change("cov_l1", 0.08))
    assert printed(_find(r"at a higher MSE \(([+\d.]+)%, the paper", text)[0], change("l1", 0.08))
    assert printed(_find(r"λ = 0.3: MSE [\d.]+, ([+\d.]+)%, CVR", text)[0], change("l1", 0.3))
    low, high = _find(r"none and L_Σ runs \(([−+\d.]+)% to ([+\d.]+)%\)", text)
    changes = [change("cov_l1", w) for (p, w) in summary if p == "cov_l1"]
    assert printed(low, min(changes)) and printed(high, max(changes))
    first, last = _find(r"between (\d+) and (\d+) epochs", text)
    epochs = [r["epochs"] for r in data["runs"] if r["penalty"] in ("none", "cov_l1")]
    assert (int(first), int(last)) == (min(epochs), max(epochs))
    summary_row = _flat(_page().split("## Summary", 1)[1].split("\n## ", 1)[0])
    assert printed(_find(r"UD 41.7 → [\d.]+, MSE ([+\d.]+)% \(within", summary_row)[0], change("cov_l1", 0.08))
    values = _find(r"λ = 0.08: MSE ([+\d.]+)% .*?λ = 0.3: MSE ([+\d.]+)% \(L_Σ at 0.3: ([+\d.]+)%\)", summary_row)
    want = (change("l1", 0.08), change("l1", 0.3), change("cov_l1", 0.3))
    assert all(printed(v, w) for v, w in zip(values, want))


def test_reproduction_timings_are_the_runs_own():
    table = _page().split("## Commands and timings", 1)[1]
    for experiment in ("dimensionality", "dimensionality_80ep", "xor", "image_autoencoder"):
        _, data = _kept(experiment)
        [row] = [r for r in table.splitlines() if f"--output_dir results/paper/{experiment}`" in r
                 or f"--output_dir results/paper/{experiment} " in r]
        wall, cpu = re.findall(r"\| " + N + r" s", row)
        assert printed(wall, data["timing"]["wall_s"]) and printed(cpu, data["timing"]["cpu_s"]), experiment
