"""recipes/penalty_study.py: the grid runs (--quick), resumes per cell, and its statistics are right."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "recipes"))
import penalty_study  # noqa: E402


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
    assert "## int4_tensor_accuracy" in (out / "study.md").read_text()


def test_paired_differences_and_the_sign_test():
    rows = [{"size": 64, "seed": s, "penalty": "none", "m": 0.5} for s in range(5)]
    rows += [{"size": 64, "seed": s, "penalty": "x", "m": 0.5 + d} for s, d in enumerate([0.1, 0.2, 0.1, 0.3, -0.1])]
    got = penalty_study.paired(rows, "m", "x", 64)
    assert got["mean"] == pytest.approx(0.12) and got["n"] == 5 and (got["wins"], got["losses"]) == (4, 1)
    # two-sided sign test: P(at least 4 of 5 on one side) = 2 · (5 + 1) / 32
    assert got["sign_p"] == pytest.approx(12 / 32)
    ties = rows[:5] + [{"size": 64, "seed": s, "penalty": "y", "m": 0.5} for s in range(5)]
    assert penalty_study.paired(ties, "m", "y", 64)["sign_p"] == 1.0
