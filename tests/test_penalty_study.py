"""recipes/penalty_study.py: the grid runs (--quick), resumes per cell, and its statistics are right."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "recipes"))
import penalty_study  # noqa: E402

from hf_decorr.analysis import sign_test  # noqa: E402


def test_help_lists_the_options():
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "recipes", "penalty_study.py"), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in ("--output_dir", "--quick", "--sizes", "--seeds_small", "--penalties", "--steps", "--target_share"):
        assert option in proc.stdout


@pytest.mark.parametrize("bad, option", [(["--steps", "0"], "--steps"), (["--target_share", "2"], "--target_share"),
                                         (["--sizes", "1"], "--sizes")])
def test_bad_options_are_refused_naming_them(bad, option, capsys):
    with pytest.raises(SystemExit) as info:
        penalty_study.parse(["--output_dir", "x", *bad])
    assert info.value.code == 2 and option in capsys.readouterr().err


def test_quick_grid_writes_every_cell_and_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "study"
    summary = penalty_study.main(["--quick", "--output_dir", str(out)])
    cells = sorted(os.listdir(out / "cells"))
    assert len(cells) == 2 * len(penalty_study.PENALTIES) and summary["cells"] == len(cells)
    # the λ rule: λ · penalty = target share · task loss, both from the first log of a λ = 0 run
    calibration = json.loads((out / "calibration.json").read_text())
    for kind in ("cov_l1", "decov", "vicreg", "l1"):
        start = calibration[f"{kind}/start"]
        assert calibration[kind] * start["penalty"] == pytest.approx(0.05 * start["task_loss"], rel=1e-9)
    cell = json.loads((out / "cells" / "16_0_cov_l1_x3.json").read_text())
    assert cell["weight"] == pytest.approx(3 * calibration["cov_l1"])
    for key in ("dev_accuracy", "test_accuracy", "int8_tensor_accuracy", "int4_token_accuracy", "top8_accuracy"):
        assert 0.0 <= cell[key] <= 1.0
    assert set(cell["decorr"]) == {"mapc", "cvr", "ud"} and cell["cpu_minutes"] > 0
    # an interrupted grid: only the missing cell is trained again, the others are read back as they are
    stamps = {name: os.path.getmtime(out / "cells" / name) for name in cells}
    os.remove(out / "cells" / "16_1_decov.json")
    again = penalty_study.main(["--quick", "--output_dir", str(out)])
    assert sorted(os.listdir(out / "cells")) == cells
    assert all(os.path.getmtime(out / "cells" / n) == t for n, t in stamps.items() if n != "16_1_decov.json")
    assert again["paired"]["dev_accuracy"]["cov_l1"] == summary["paired"]["dev_accuracy"]["cov_l1"]
    report = (out / "study.md").read_text()
    assert "### int4_tensor_accuracy" in report and "| none |" in report and "all sizes" in report
    paths = [f["path"] for f in summary["figures"]]
    assert paths == [f"figures/{n}.png" for n in ("paired_accuracy", "accuracy", "decorrelation")]
    for path in paths:
        assert (out / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({path})" in report
    # the absolute table of a cell is the mean over its seeds, read back from the cells
    values = [json.loads((out / "cells" / f"16_{s}_l1.json").read_text())["dev_accuracy"] for s in (0, 1)]
    assert summary["absolute"]["dev_accuracy"]["l1"]["16"]["mean"] == pytest.approx(sum(values) / 2)


def test_no_figures_writes_the_tables_only(tmp_path, monkeypatch):
    """Without matplotlib the recipe refuses at once unless --no_figures; with it, no figures/ is written."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        penalty_study.parse(["--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert not penalty_study.parse(["--output_dir", str(tmp_path), "--no_figures"]).quick


def test_paired_differences_and_the_sign_test():
    rows = [{"size": 64, "seed": s, "penalty": "none", "m": 0.5} for s in range(5)]
    rows += [{"size": 64, "seed": s, "penalty": "x", "m": 0.5 + d} for s, d in enumerate([0.1, 0.2, 0.1, 0.3, -0.1])]
    got = penalty_study.paired(rows, "m", "x", 64)
    assert got["mean"] == pytest.approx(0.12) and got["n"] == 5 and (got["wins"], got["losses"]) == (4, 1)
    # two-sided sign test: P(at least 4 of 5 on one side) = 2 · (5 + 1) / 32
    assert got["sign_p"] == pytest.approx(12 / 32)
    ties = rows[:5] + [{"size": 64, "seed": s, "penalty": "y", "m": 0.5} for s in range(5)]
    assert penalty_study.paired(ties, "m", "y", 64)["sign_p"] == 1.0


def test_confidence_interval_pooling_and_the_significance_threshold():
    diffs = [0.1, 0.2, 0.1, 0.3, -0.1]
    rows = [{"size": 64, "seed": s, "penalty": "none", "m": 0.5} for s in range(5)]
    rows += [{"size": 64, "seed": s, "penalty": "x", "m": 0.5 + d} for s, d in enumerate(diffs)]
    # a second size: the pooled comparison runs over the pairs of both, matched by (size, seed)
    rows += [{"size": 128, "seed": s, "penalty": "none", "m": 0.6 + s / 100} for s in range(3)]
    rows += [{"size": 128, "seed": s, "penalty": "x", "m": 0.6 + s / 100 - 0.05} for s in range(3)]
    got = penalty_study.paired(rows, "m", "x", 64)
    mean, std = sum(diffs) / 5, statistics.stdev(diffs)
    half = 2.776 * std / math.sqrt(5)  # t(0.975, 4 df)
    assert got["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-3)
    pooled = penalty_study.paired(rows, "m", "x")
    assert pooled["n"] == 8 and (pooled["wins"], pooled["losses"]) == (4, 4) and pooled["sign_p"] == 1.0
    assert pooled["mean"] == pytest.approx((sum(diffs) - 0.15) / 8)
    # p <= 0.05 needs 13 of 16 on one side (2 * 697 / 65536 = 0.021; 12 of 16 gives 0.077); 5 pairs never do
    assert penalty_study.smallest_significant_split(16) == 13
    assert sign_test(13, 3) == pytest.approx(2 * 697 / 2 ** 16)
    assert penalty_study.smallest_significant_split(5) is None


def test_t_quantiles_are_students():
    stats = pytest.importorskip("scipy.stats")
    from hf_decorr.analysis import T975

    for df, q in T975.items():
        assert q == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4), df


def test_decorrelation_metrics_are_read_from_the_cells():
    rows = [{"size": 64, "seed": s, "penalty": "none", "decorr": {"cvr": 10.0 + s}} for s in range(3)]
    got = penalty_study.absolute(rows, "decorr.cvr", "none", 64)
    assert got == {"mean": 11.0, "std": 1.0, "n": 3}
