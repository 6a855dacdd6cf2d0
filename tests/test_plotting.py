"""hf_decorr.plotting and hf_decorr.app.reporting: figures, spectra, tables, atomic writes."""

import json
import math
import os

import numpy as np
import pytest
import torch

from hf_decorr.app.outputs import write_json_atomic as write_json
from hf_decorr.app.reporting import (
    aggregate,
    format_mean_std,
    markdown_table,
    mean_std,
    to_jsonable,
)
from hf_decorr.atomic import staged_directory
from hf_decorr.atomic import write_text_atomic as write_text
from hf_decorr.metrics import CovarianceAccumulator, decorrelation_metrics
from hf_decorr.plotting import (
    correlation_from_covariance,
    new_figure,
    plot_covariance,
    plot_histories,
    plot_matrix,
    plot_metric_curves,
    plot_spectra,
    plot_spectrum,
    save_figure,
    spectrum,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cov() -> torch.Tensor:
    acc = CovarianceAccumulator()
    h = torch.randn(200, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
    h[:, 4] = 3.0  # a dead (constant) unit
    acc.update(h)
    return acc.covariance()


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


# ---- plotting: numbers --------------------------------------------------------------------------


def test_correlation_matches_definition_and_zeroes_dead_units():
    cov = _cov()
    r = correlation_from_covariance(cov)
    c = cov.numpy()
    assert r[0, 1] == pytest.approx(c[0, 1] / math.sqrt(c[0, 0] * c[1, 1]))
    assert np.allclose(np.diag(r)[:4], 1.0)
    assert np.all(r[4, :] == 0) and np.all(r[:, 4] == 0)
    # the mean |R| over live off-diagonal pairs is the library's MAPC
    live = r[:4, :4]
    mapc = (np.abs(live).sum() - 4) / 12
    assert mapc == pytest.approx(decorrelation_metrics(cov)["mapc"])


def test_spectrum_kinds_sorted_and_total():
    cov = _cov()
    var = spectrum(cov, "variance")
    eig = spectrum(cov, "eigenvalues")
    assert np.all(np.diff(var) <= 0) and np.all(np.diff(eig) <= 1e-12)
    assert var.sum() == pytest.approx(float(torch.trace(cov)))
    assert eig.sum() == pytest.approx(float(torch.trace(cov)))
    assert var[-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="kind='pca'.*variance.*eigenvalues"):
        spectrum(cov, "pca")
    with pytest.raises(ValueError, match="square"):
        spectrum(np.zeros((2, 3)))


# ---- plotting: figures ------------------------------------------------------------------------------


def test_every_plot_function_writes_a_png(tmp_path):
    cov = _cov()
    fig, axes = new_figure(2, 3)
    assert axes.shape == (2, 3)
    plot_covariance(cov, axes[0, 0], title="|C|", annotate=True)
    plot_covariance(cov, axes[0, 1], correlation=True)
    plot_matrix(cov.numpy(), axes[0, 2], absolute=False, tick_labels=list("abcde"))
    plot_spectrum(cov, axes[1, 0], kind="eigenvalues", threshold=0.1, log=True)
    plot_spectrum(cov, axes[1, 1], style="strip")
    plot_spectra({"run a": cov, "run b": [3.0, 1.0]}, axes[1, 2], normalise=False)
    path = save_figure(fig, tmp_path / "sub" / "fig.png")
    assert path.exists() and path.stat().st_size > 1000 and _is_png(path)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]  # no temporary file left


def test_plot_spectrum_rejects_bad_style_and_shape():
    with pytest.raises(ValueError, match="style='pie'"):
        plot_spectrum([1.0, 2.0], style="pie")
    with pytest.raises(ValueError, match="covariance matrix"):
        plot_spectrum(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="at least one"):
        plot_spectra({})


def test_metric_curves_average_repeats_and_share_baseline(tmp_path):
    records = [
        {"penalty": pen, "weight": w, "draw": d, "mse": w * (1 + d) + 0.01, "tdv": 0.5 + w / 2}
        for pen in ("cov_l1", "l1")
        for w in (0.1, 1.0)
        for d in range(3)
    ]
    shared = [{"penalty": "none", "weight": 0.0, "draw": d, "mse": 0.01, "tdv": 0.5} for d in range(3)]
    fig, axes = new_figure()
    ax = plot_metric_curves(
        records,
        x="mse",
        y="tdv",
        group="penalty",
        order="weight",
        ax=axes[0, 0],
        shared=shared,
        labels={"cov_l1": "L_Σ"},
        annotate=True,
        reference=1.0,
    )
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["L_Σ", "l1"]
    # each curve: λ = 0 (shared) + two λ, x = mean over the three draws
    lines = [container.lines[0] for container in ax.containers]  # one errorbar container per curve
    assert len(lines) == 2
    assert np.allclose(lines[0].get_xdata(), [0.01, 0.1 * 2 + 0.01, 1.0 * 2 + 0.01])
    assert np.allclose(lines[1].get_ydata(), [0.5, 0.55, 1.0])
    assert _is_png(save_figure(fig, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="at least one record"):
        plot_metric_curves([], x="a", y="b", group="c", order="d")


def test_plot_histories(tmp_path):
    fig, axes = new_figure()
    plot_histories({"a": [(1, 1.0), (2, 0.5)], "b": [(1, 2.0), (2, 1.0)], "empty": []}, axes[0, 0], logy=True)
    assert len(axes[0, 0].get_lines()) == 2
    assert _is_png(save_figure(fig, tmp_path / "h.png"))


# ---- reporting ------------------------------------------------------------------------------------------


def test_mean_std_sample_std_and_non_finite():
    mean, std, n = mean_std([1.0, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4)
    assert std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    assert all(math.isnan(v) for v in mean_std([1.0, float("nan")])[:2])
    assert all(math.isnan(v) for v in mean_std([])[:2])
    assert mean_std([torch.tensor(2.0), np.float32(4.0)])[0] == 3.0


def test_aggregate_groups_in_order_and_names_missing_metric():
    records = [{"p": "b", "w": 1, "m": 1.0}, {"p": "a", "w": 1, "m": 3.0}, {"p": "b", "w": 1, "m": 3.0}]
    rows = aggregate(records, ["p", "w"], ["m"])
    assert [(r["p"], r["n"]) for r in rows] == [("b", 2), ("a", 1)]
    assert rows[0]["m_mean"] == 2.0 and rows[0]["m_std"] == pytest.approx(math.sqrt(2))
    with pytest.raises(KeyError, match="'x'"):
        aggregate(records, ["p"], ["x"])
    with pytest.raises(KeyError, match="grouping key"):
        aggregate(records, ["q"], ["m"])


def test_markdown_table_mean_std_formats_and_escaping():
    rows = [{"name": "a|b", "m_mean": 0.12345, "m_std": 0.01, "k": 3, "f": float("nan"), "none": None}]
    text = markdown_table(rows, ["name", ("m", "metric"), "k", "f", "none", "absent"], {"m": ".2f"})
    lines = text.strip().splitlines()
    assert lines[0] == "| name | metric | k | f | none | absent |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| a\\|b | 0.12 ± 0.01 | 3 | nan | — | — |"
    assert format_mean_std(1.0, 0.5, ".1f") == "1.0 ± 0.5"


def test_write_json_is_strict_and_atomic(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": float("nan"), "t": torch.tensor([1.5, 2.0]), "n": np.int64(3)})
    data = json.loads(path.read_text())
    assert data == {"a": None, "t": [1.5, 2.0], "n": 3}
    assert to_jsonable({"x": (float("inf"),)}) == {"x": [None]}
    write_text(tmp_path / "r.md", "hello\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_staged_directory_replaces_on_success_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "out"
    with staged_directory(target) as d:
        (d / "a.txt").write_text("1")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "1"
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(RuntimeError, match="boom"), staged_directory(target) as d:
        (d / "b.txt").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # the old, complete outputs
    with staged_directory(target) as d:
        (d / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folders left
    with pytest.raises(FileExistsError, match="exists"), staged_directory(target, overwrite=False):
        pass
    assert os.path.isdir(target)
