"""The penalties against float64 references written straight from the formulas."""

import math

import numpy as np
import pytest
import torch

from hf_decorr.penalties import PENALTIES, decorrelation_penalty, masked_covariance

#: the built-in penalties (other test modules register more in the same process)
BUILT_IN = ("cov_l1", "decov", "vicreg", "l1")


def reference(h: np.ndarray, mask: np.ndarray, kind: str) -> float:
    """Loop-level float64 implementation of each formula on the valid rows only."""
    rows = [h[k].astype(np.float64) for k in range(h.shape[0]) if mask[k]]
    n, p = len(rows), h.shape[1]
    if kind == "l1":
        return sum(abs(x) for r in rows for x in r) / (n * p) if n else 0.0
    if n < 2:
        return 0.0
    mean = [sum(r[i] for r in rows) / n for i in range(p)]
    denom = n if kind == "decov" else n - 1
    cov = [[sum((r[i] - mean[i]) * (r[j] - mean[j]) for r in rows) / denom for j in range(p)] for i in range(p)]
    if kind == "cov_l1":
        return sum(abs(cov[i][j]) for i in range(p) for j in range(p)) / p**2
    off = sum(cov[i][j] ** 2 for i in range(p) for j in range(p) if i != j)
    return 0.5 * off if kind == "decov" else off / p


def random_batch(n=23, p=6, seed=0, pad=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, p, generator=g) * torch.linspace(0.5, 3.0, p) + torch.randn(p, generator=g) * 4
    h[:, 1] += 0.8 * h[:, 0]  # a correlated pair
    mask = torch.rand(n, generator=g) > pad
    return h, mask


@pytest.mark.parametrize("kind", BUILT_IN)
def test_matches_float64_reference_with_padding(kind):
    h, mask = random_batch()
    h_padded = h.clone()
    h_padded[~mask] = 1e3  # garbage in padding rows must not matter
    got = decorrelation_penalty(h_padded, mask, kind)
    want = reference(h.numpy(), mask.numpy(), kind)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) <= 1e-5 * abs(want)


@pytest.mark.parametrize("kind", BUILT_IN)
def test_gradcheck_float64(kind):
    h, mask = random_batch(n=9, p=4, seed=1)
    h = h.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: decorrelation_penalty(x, mask, kind), (h,))
    stacked = torch.stack([h.detach(), h.detach() * 0.5 + 1]).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: decorrelation_penalty(x, mask, kind), (stacked,))


def test_covariance_matches_torch_cov():
    h, mask = random_batch()
    cov, n = masked_covariance(h.double(), mask)
    assert n.item() == mask.sum().item()
    torch.testing.assert_close(cov, torch.cov(h[mask].double().T), rtol=1e-12, atol=1e-12)
    cov_b, _ = masked_covariance(h.double(), mask, correction=0)
    torch.testing.assert_close(cov_b, torch.cov(h[mask].double().T, correction=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", BUILT_IN)
def test_batched_layers_equal_one_by_one(kind):
    layers = [random_batch(seed=s)[0] for s in range(3)]
    _, mask = random_batch(seed=7)
    stacked = decorrelation_penalty(torch.stack(layers), mask, kind)
    single = torch.stack([decorrelation_penalty(x, mask, kind) for x in layers])
    torch.testing.assert_close(stacked, single, rtol=1e-6, atol=0)
    masks = torch.stack([random_batch(seed=s)[1] for s in (3, 4, 5)])
    per_mask = decorrelation_penalty(torch.stack(layers), masks, kind)
    single = torch.stack([decorrelation_penalty(x, m, kind) for x, m in zip(layers, masks)])
    torch.testing.assert_close(per_mask, single, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_is_computed_in_float32(dtype):
    h, mask = random_batch()
    got = decorrelation_penalty(h.to(dtype), mask)
    want = decorrelation_penalty(h.to(dtype).float(), mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = decorrelation_penalty(h, mask)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, decorrelation_penalty(h, mask), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", BUILT_IN)
@pytest.mark.parametrize("valid", [0, 1])
def test_fewer_than_two_samples_is_zero_with_finite_gradient(kind, valid):
    h = torch.randn(5, 3, requires_grad=True)
    mask = torch.zeros(5, dtype=torch.bool)
    mask[:valid] = True
    value = decorrelation_penalty(h, mask, kind)
    value.backward()
    assert torch.isfinite(h.grad).all()
    if kind != "l1" or valid == 0:
        assert value.item() == 0.0


def test_single_row_without_mask_is_zero():
    assert decorrelation_penalty(torch.randn(1, 4)).item() == 0.0


@pytest.mark.parametrize("kind", BUILT_IN)
def test_non_finite_valid_rows_are_not_hidden(kind):
    h, mask = random_batch()
    h[int(mask.nonzero()[0])] = math.nan
    assert torch.isnan(decorrelation_penalty(h, mask, kind))
    h, mask = random_batch()
    h[int(mask.nonzero()[0]), 0] = math.inf
    assert not torch.isfinite(decorrelation_penalty(h, mask, kind))


@pytest.mark.parametrize("kind", BUILT_IN)
def test_non_finite_padding_rows_do_not_leak(kind):
    h, mask = random_batch()
    h = h.requires_grad_()
    poisoned = torch.where(mask.unsqueeze(-1), h, torch.full_like(h, math.nan))
    value = decorrelation_penalty(poisoned, mask, kind)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(h.grad).all()
    assert (h.grad[~mask] == 0).all()


def test_unknown_penalty_names_the_option():
    with pytest.raises(ValueError, match=r"decorr_penalty='nope'.*cov_l1"):
        decorrelation_penalty(torch.randn(4, 3), None, "nope")


def test_diagonal_is_included_in_cov_l1():
    # independent units: only the diagonal contributes, and it is penalised
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    cov = torch.cov(h.T)
    assert cov[0, 1] == 0
    assert decorrelation_penalty(h).item() == pytest.approx(cov.diagonal().sum().item() / 4)
    assert decorrelation_penalty(h, kind="decov").item() == 0.0
    assert decorrelation_penalty(h, kind="vicreg").item() == 0.0


def test_built_in_penalties_are_registered_with_their_divisors():
    assert set(BUILT_IN) <= set(PENALTIES)
    assert {k: (PENALTIES[k].of_covariance, PENALTIES[k].correction) for k in BUILT_IN} == {
        "cov_l1": (True, 1), "decov": (True, 0), "vicreg": (True, 1), "l1": (False, 1)}
