"""hf_decorr.analysis against references written from the definitions: float64 covariances of the hidden states
that transformers itself returns, the ablation and quantization formulas, accuracy counted by hand, and the
t interval and sign test of paired differences."""

import math
import statistics

import pytest
import torch
from tiny_models import tiny_bert

from hf_decorr import fake_quantize, resolve_layers
from hf_decorr.analysis import (
    LayerSamples,
    PairedStatistics,
    classifier_accuracy,
    keep_units,
    layer_statistics,
    paired_differences,
    quantized_outputs,
    sign_test,
)


def padded_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for lengths in ([5, 3, 7], [2, 7, 6]):
        ids = torch.randint(2, 100, (len(lengths), 7), generator=g)
        mask = (torch.arange(7) < torch.tensor(lengths).unsqueeze(1)).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def reference_covariance(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    centred = rows - rows.mean(0)
    return centred.T @ centred / (rows.shape[0] - 1)


@pytest.mark.parametrize("pooling", ["tokens", "mean"])
def test_layer_statistics_are_the_covariance_of_the_valid_samples(pooling):
    model = tiny_bert().eval()
    layers = resolve_layers(model, ["-1", "0"])
    batches = padded_batches()
    stats = layer_statistics(model, layers, batches, pooling=pooling)
    assert list(stats) == layers
    for index, name in ((2, layers[0]), (1, layers[1])):  # hidden_states[i + 1] is block i's output
        rows = []
        with torch.no_grad():
            for inputs in batches:
                hidden = model(**inputs, output_hidden_states=True).hidden_states[index]
                mask = inputs["attention_mask"].bool()
                if pooling == "tokens":
                    rows.append(hidden[mask])
                else:
                    rows.append((hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))
        rows = torch.cat(rows)
        assert int(stats[name].statistics()[0]) == rows.shape[0]
        torch.testing.assert_close(stats[name].covariance(), reference_covariance(rows), rtol=1e-5, atol=1e-7)


def test_paired_statistics_cka_is_one_for_a_layer_with_itself_and_invariant_to_scaling():
    model = tiny_bert().eval()
    layers = resolve_layers(model, ["-1", "0"])
    same, other = PairedStatistics(), PairedStatistics()
    with LayerSamples(model, layers) as capture:
        for inputs in padded_batches():
            samples, _ = capture.samples(inputs)
            same.update(samples[layers[0]], 3.0 * samples[layers[0]])
            other.update(samples[layers[0]], samples[layers[1]])
    assert same.linear_cka() == pytest.approx(1.0, abs=1e-9)
    assert 0.0 < other.linear_cka() < 1.0


def test_layer_samples_names_the_setting_when_a_layer_does_not_run():
    model = tiny_bert().eval()
    model.unused = torch.nn.Linear(2, 2)  # a module that the forward never calls
    with LayerSamples(model, ["unused"]) as capture, pytest.raises(ValueError, match="decorr_layers: module 'unused' "
                                                                                    "did not run"):
        capture.samples(padded_batches()[0])
    with pytest.raises(ValueError, match="decorr_layers: 'nope' is not a module"):
        LayerSamples(model, ["nope"])


def test_keep_units_sets_the_others_to_their_mean_and_only_inside_the_with():
    model = tiny_bert().eval()
    block = model.bert.encoder.layer[1]
    inputs = padded_batches()[0]
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    keep = torch.zeros(32, dtype=torch.bool)
    keep[:5] = True
    mean = torch.linspace(-1, 1, 32)
    with torch.no_grad():
        model(**inputs)
        with keep_units(block, keep, mean):
            logits = model(**inputs).logits
        after = model(**inputs).logits
    handle.remove()
    plain = seen[0]
    # what the classifier saw inside the with: recompute with the edited hidden states
    edited = torch.where(keep, plain, mean)
    with torch.no_grad():
        want = model.classifier(model.bert.pooler(edited))
    torch.testing.assert_close(logits, want)
    assert not torch.allclose(logits, after)  # the hook is gone after the with
    assert len(block._forward_hooks) == 0


def test_quantized_outputs_apply_fake_quantize_and_refuse_bad_settings():
    model = tiny_bert().eval()
    block = model.bert.encoder.layer[1]
    inputs = padded_batches()[1]
    outputs = []
    with torch.no_grad():
        model(**inputs)
        handle = block.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        model(**inputs)
        with quantized_outputs([block], bits=4, granularity="token"):
            quantized_logits = model(**inputs).logits
        handle.remove()
        want = model.classifier(model.bert.pooler(fake_quantize(outputs[0], 4, "token")))
    torch.testing.assert_close(quantized_logits, want)
    with pytest.raises(ValueError, match="granularity"), quantized_outputs([block], bits=4, granularity="row"):
        pass


def test_classifier_accuracy_counts_the_right_rows():
    model = tiny_bert().eval()
    batches = padded_batches()
    with torch.no_grad():
        predictions = torch.cat([model(**b).logits.argmax(-1) for b in batches])
    labels = predictions.clone()
    labels[[0, 4]] = 1 - labels[[0, 4]]  # two of six wrong
    accuracy = classifier_accuracy(model, [(slice(0, 3), batches[0]), (slice(3, 6), batches[1])], labels)
    assert accuracy == pytest.approx(4 / 6)


def test_paired_differences_and_sign_test():
    diffs = [0.003, -0.003, 0.010, 0.007, 0.003]
    got = paired_differences(diffs)
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = 2.776 * std / math.sqrt(5)  # Student's t, 4 degrees of freedom
    assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(std)
    assert got["ci95"] == pytest.approx([mean - half, mean + half])
    assert (got["wins"], got["losses"], got["n"]) == (4, 1, 5)
    assert got["sign_p"] == pytest.approx(2 * (5 + 1) / 32)  # P(X >= 4 | n = 5, 1/2), two-sided
    assert sign_test(0, 0) == 1.0 and sign_test(8, 0) == pytest.approx(2 / 256)
    assert paired_differences([0.5])["ci95"] is None


def test_bad_settings_name_the_option():
    model = tiny_bert().eval()
    with pytest.raises(ValueError, match=r"decorr_pooling='max' is not valid; choose one of \['tokens', 'mean'"):
        LayerSamples(model, ["bert.pooler"], pooling="max")
    from hf_decorr.analysis import replace_units

    with pytest.raises(ValueError, match=r"keep and mean must have the layer's 5 units"):
        replace_units(torch.zeros(2, 5), torch.ones(3, dtype=torch.bool), torch.zeros(3))
