"""Fake quantization (hf_decorr.quantization) and the ``hf-decorr quantize`` command."""

import json

import pytest
import torch
from test_commands import _assert_one_line_error, _run, _texts, tiny  # noqa: F401 - the module-scoped fixture

from hf_decorr.quantization import fake_quantize


def reference(h: torch.Tensor, bits: int, per_token: bool) -> torch.Tensor:
    """Straight from the formula, in float64, one element at a time for the scale's scope."""
    q = 2 ** (bits - 1) - 1
    x = h.double()
    out = torch.empty_like(x)
    rows = x.reshape(-1, x.shape[-1]) if per_token else x.reshape(1, -1)
    flat = out.reshape(rows.shape)
    for i, row in enumerate(rows):
        peak = max(abs(v) for v in row.tolist())
        s = peak / q if peak > 0 else 1.0
        flat[i] = torch.tensor([max(-q, min(q, round(v / s))) * s for v in row.tolist()], dtype=torch.float64)
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_fake_quantize_matches_the_formula(bits, granularity):
    g = torch.Generator().manual_seed(bits)
    h = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1, 1).double()
    got = fake_quantize(h, bits, granularity)
    want = reference(h, bits, granularity == "token")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # at most 2^bits − 1 distinct values per scale's scope, all within the range
    scopes = got.reshape(-1, 7) if granularity == "token" else got.reshape(1, -1)
    assert all(len(set(s.tolist())) <= 2 ** bits - 1 for s in scopes)


def test_fake_quantize_keeps_dtype_zeros_and_refuses_bad_settings():
    h = torch.randn(4, 6).to(torch.bfloat16)
    assert fake_quantize(h, 8).dtype == torch.bfloat16
    zeros = torch.zeros(2, 3)
    assert torch.equal(fake_quantize(zeros, 4, "token"), zeros)
    # int16 barely changes a tensor, int2 keeps only the sign and the peak
    x = torch.randn(64, 32)
    assert (fake_quantize(x, 16) - x).abs().max() <= x.abs().max() / (2 ** 15 - 1)
    assert set(fake_quantize(x, 2).unique().tolist()) <= {-x.abs().max().item(), 0.0, x.abs().max().item()}
    for bad in (1, 17, 8.0, True):
        with pytest.raises(ValueError, match="bits must be an integer from 2 to 16"):
            fake_quantize(x, bad)
    with pytest.raises(ValueError, match=r"granularity='channel' is not valid; choose one of \['tensor', 'token'\]"):
        fake_quantize(x, 8, "channel")
    with pytest.raises(ValueError, match="needs floating-point"):
        fake_quantize(torch.ones(2, 2, dtype=torch.long), 8)


def test_quantize_command_equals_an_independent_reference(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "q"
    code, _, err = _run(["quantize", tiny["a"], "--data", tiny["data"], "--layers", "-1", "--bits", "4", "2",
                         "--label_column", "label", "--batch_size", "64", "--output_dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "quantize.json").read_text())
    [run] = report["runs"]
    assert set(run["accuracy"]) == {"full", "int4/tensor", "int4/token", "int2/tensor", "int2/token"}
    assert run["layers"] == ["bert.encoder.layer.1"]
    assert "| accuracy int4/tensor |" in (out / "quantize.md").read_text()
    from transformers import AutoModelForSequenceClassification

    rows = _texts(37, 0)
    batch = tiny["tokenizer"]([t for t, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([label for _, label in rows])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["a"]).eval()
    with torch.no_grad():
        h = model(**batch, output_hidden_states=True).hidden_states[-1]  # the last block's output, one batch
        accuracy = lambda x: int((model.classifier(model.bert.pooler(x)).argmax(-1) == labels).sum()) / len(labels)
        assert run["accuracy"]["full"] == pytest.approx(accuracy(h), abs=1e-12)
        for bits in (4, 2):
            for granularity in ("tensor", "token"):
                want = accuracy(reference(h, bits, granularity == "token").float())
                got = run["accuracy"][f"int{bits}/{granularity}"]
                assert got == pytest.approx(want, abs=1e-12), (bits, granularity)


def test_quantize_command_bad_input_is_one_line(tiny, tmp_path, capsys):  # noqa: F811
    code, _, err = _run(["quantize", tiny["a"], "--data", tiny["data"], "--bits", "1", "--output_dir",
                         tmp_path / "x"], capsys)
    assert code == 2 and "bits=1 must be an integer from 2 to 16" in err
    code, _, err = _run(["quantize", tiny["a"], "--data", tiny["data"], "--layers", "nope.*", "--label_column",
                         "label", "--output_dir", tmp_path / "y"], capsys)
    _assert_one_line_error(code, err, "--layers")
    assert not (tmp_path / "y").exists()
