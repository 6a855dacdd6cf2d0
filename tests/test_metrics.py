"""The paper's metrics against a NumPy reference, and streaming invariance."""

import math

import numpy as np
import pytest
import torch

from hf_decorr.metrics import CovarianceAccumulator, decorrelation_metrics


def numpy_metrics(x: np.ndarray, top_d: int, share: float) -> dict:
    c = np.cov(x.T)  # unbiased
    p = c.shape[0]
    v = np.clip(np.diag(c), 0, None)
    live = v > 1e-10 * v.max()
    idx = np.flatnonzero(live)
    corr = np.abs(c[np.ix_(idx, idx)]) / np.sqrt(np.outer(v[idx], v[idx]))
    k = len(idx)
    mapc = (corr.sum() - np.trace(corr)) / (k * k - k)
    sorted_v = np.sort(v)[::-1]
    eig = np.sort(np.clip(np.linalg.eigvalsh(c), 0, None))[::-1]

    def units(values):
        return int(np.argmax(np.cumsum(values) / values.sum() >= share - 1e-12)) + 1

    return {
        "mapc": mapc,
        "cvr": np.abs(c).sum() / np.trace(c),
        "tdv": sorted_v[:top_d].sum() / v.sum(),
        "ud": units(sorted_v),
        "pca_ud": units(eig),
        "cov_l1": np.abs(c).sum() / p**2,
        "live_units": k,
    }


def data(n=400, p=8, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * np.array([3.0, 1.0, 0.3])
    x = z @ rng.normal(size=(3, p)) + 0.05 * rng.normal(size=(n, p)) + rng.normal(size=p) * 5
    return x


@pytest.mark.parametrize("top_d,share", [(2, 0.9), (4, 0.5), (8, 0.99)])
def test_metrics_match_numpy(top_d, share):
    x = data()
    acc = CovarianceAccumulator()
    acc.update(torch.tensor(x, dtype=torch.float32))
    got = decorrelation_metrics(acc.covariance(), top_d=top_d, variance_share=share)
    want = numpy_metrics(x.astype(np.float32).astype(np.float64), top_d, share)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("splits", [[400], [1, 399], [7, 100, 293], [200, 200], [13] * 30 + [10]])
def test_streamed_equals_one_shot(splits):
    x = torch.tensor(data(), dtype=torch.float64)
    one = CovarianceAccumulator()
    one.update(x)
    streamed = CovarianceAccumulator()
    for chunk in torch.split(x, splits):
        streamed.update(chunk)
    torch.testing.assert_close(streamed.covariance(), one.covariance(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(one.covariance(), torch.cov(x.T), rtol=1e-10, atol=1e-10)
    a = decorrelation_metrics(streamed.covariance())
    b = decorrelation_metrics(one.covariance())
    assert a == pytest.approx(b, rel=1e-9)


def test_mask_and_merge():
    x = torch.tensor(data(), dtype=torch.float64)
    mask = torch.rand(len(x)) > 0.4
    padded = x.clone()
    padded[~mask] = float("nan")
    left, right = CovarianceAccumulator(), CovarianceAccumulator()
    left.update(padded[:150], mask[:150])
    right.update(padded[150:], mask[150:])
    merged = left.merge_(right)
    assert merged.count.item() == mask.sum().item()
    torch.testing.assert_close(merged.covariance(), torch.cov(x[mask].T), rtol=1e-10, atol=1e-10)


def test_zero_variance_units_give_no_nan():
    x = data()
    x[:, 2] = 1.5  # a dead unit
    x[:, 5] = 0.0
    acc = CovarianceAccumulator()
    acc.update(torch.tensor(x))
    m = decorrelation_metrics(acc.covariance())
    assert all(np.isfinite(v) for v in m.values())
    assert m["live_units"] == 6
    live = np.delete(x, [2, 5], axis=1)
    assert m["mapc"] == pytest.approx(numpy_metrics(live, 2, 0.9)["mapc"], rel=1e-9)


def test_constant_layer_and_single_sample():
    acc = CovarianceAccumulator()
    acc.update(torch.ones(10, 4))
    m = decorrelation_metrics(acc.covariance())
    # a constant layer is not perfectly decorrelated: its metrics are undefined (NaN), not CVR 1 / MAPC 0
    assert all(math.isnan(m[k]) for k in ("mapc", "cvr", "tdv", "ud", "pca_ud"))
    assert m["cov_l1"] == 0.0 and m["live_units"] == 0.0
    one = CovarianceAccumulator()
    one.update(torch.randn(1, 4))
    assert torch.equal(one.covariance(), torch.zeros(4, 4, dtype=torch.float64))


def test_non_finite_activations_are_reported():
    x = torch.tensor(data())
    x[3, 1] = float("inf")
    acc = CovarianceAccumulator()
    acc.update(x)
    m = decorrelation_metrics(acc.covariance())
    assert all(np.isnan(m[k]) for k in ("mapc", "cvr", "ud"))


def test_independent_units_have_cvr_one_and_paper_example():
    # a diagonal covariance: CVR at its optimum 1, MAPC 0, and UD counts units by variance
    c = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    m = decorrelation_metrics(c, top_d=4, variance_share=0.9)
    assert m["cvr"] == 1.0 and m["mapc"] == 0.0 and m["tdv"] == 1.0
    # 4+3+2 hold exactly 90% of the variance: UD_90% = 3 although 4 units are alive (the paper's
    # "sometimes 3"), while a 95% share needs all 4
    assert m["ud"] == 3 and m["live_units"] == 4
    assert decorrelation_metrics(c, variance_share=0.95)["ud"] == 4
