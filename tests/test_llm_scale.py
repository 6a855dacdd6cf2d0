"""The low-memory penalty path (hf_decorr.gram): exactness, what it keeps for the backward, precision emulation,
subsampling and the new options. Memory and speed figures come from benchmarks/llm_scale.py, not from tests."""

import pytest
import torch
from tiny_models import tiny_llama

from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.gram import (
    PRECISIONS,
    cov_l1_lowmem,
    lowmem_covariance,
    pack_signs,
    resolve_precision,
    round_to_precision,
    unpack_signs,
)


def correlated(n=37, p=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, p, generator=g) @ (torch.eye(p) + 0.4 * torch.randn(p, p, generator=g))
    h = h * torch.linspace(0.3, 2.0, p) + 3.0
    mask = torch.rand(n, generator=g) > 0.25
    return h.to(dtype), mask


def reference_cov(h, mask, correction=1):
    rows = h[mask].double()
    return torch.cov(rows.T, correction=correction)


@pytest.mark.parametrize("chunk", [8, 16, 40])
def test_chunked_covariance_and_gradient_match_float64(chunk):
    h, mask = correlated(n=37, p=13)  # N = 37 not a multiple of any chunk, p = 13 not a multiple of 8
    padded = h.clone()
    padded[~mask] = float("nan")  # padding rows must not leak, even NaN
    x = padded.clone().requires_grad_()
    cov, n = lowmem_covariance(x, mask, chunk=chunk)
    assert n.item() == mask.sum().item() and cov.dtype == torch.float32
    torch.testing.assert_close(cov.double(), reference_cov(h, mask), rtol=1e-5, atol=1e-5)
    weights = torch.randn(13, 13, generator=torch.Generator().manual_seed(5))
    (cov * weights).sum().backward()
    ref = h.double().requires_grad_()
    (reference_cov(ref, mask) * weights.double()).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_fused_cov_l1_matches_float64_value_and_gradient(chunk):
    h, mask = correlated(n=45, p=21, seed=1)  # 21 columns: blocks of 8 and 16 leave partial ones
    x = h.clone().requires_grad_()
    value = cov_l1_lowmem(x, mask, chunk=chunk)
    value.backward()
    ref = h.double().requires_grad_()
    want = reference_cov(ref, mask).abs().sum() / 21**2
    want.backward()
    assert abs(value.item() - want.item()) <= 1e-6 * want.item()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_gradcheck_chunked_paths_with_mask_and_index():
    h, mask = correlated(n=11, p=5, seed=2, dtype=torch.float64)
    x = h.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cov_l1_lowmem(t, mask, chunk=8), (x,))
    assert torch.autograd.gradcheck(lambda t: lowmem_covariance(t, mask, chunk=8)[0].square().sum(), (x,))
    index = torch.tensor([9, 0, 4, 7, 2, 10, 5])
    assert torch.autograd.gradcheck(lambda t: cov_l1_lowmem(t, mask[index], index=index, chunk=8), (x,))
    stacked = torch.stack([h.detach(), h.detach() * 0.5 + 1]).requires_grad_()
    masks = torch.stack([mask, ~mask])
    assert torch.autograd.gradcheck(lambda t: cov_l1_lowmem(t, masks, chunk=8), (stacked,))


def test_index_selects_the_sample_rows():
    h, mask = correlated(n=30, p=9, seed=3, dtype=torch.float64)
    index = torch.randperm(30, generator=torch.Generator().manual_seed(0))[:17]
    got = cov_l1_lowmem(h, mask[index], index=index, chunk=8)
    want = reference_cov(h[index], mask[index]).abs().sum() / 81
    assert abs(got.item() - want.item()) <= 1e-12 * want.item()


def test_signs_pack_and_unpack_exactly():
    x = torch.randn(5, 7, 19)
    x[0, 0, :5] = 0.0
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 5, 7, 3)  # 2 bit planes, ⌈19/8⌉ bytes
    assert torch.equal(unpack_signs(packed, 19), torch.sign(x))


def test_backward_keeps_the_layer_output_itself_and_small_state_only():
    n, p = 512, 96
    h = (torch.randn(n, p) + 1).to(torch.bfloat16).requires_grad_()
    mask = torch.rand(n) > 0.1
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = cov_l1_lowmem(h, mask, chunk=64)
    big = [t for t in saved if t.numel() >= n * p]
    assert big and all(t.data_ptr() == h.data_ptr() and t.dtype == torch.bfloat16 for t in big)  # no copy of H
    small = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != h.data_ptr())
    assert small <= p * p // 4 + 2 * p + 4 * p + n + 64  # packed signs (p²/4), mean, mask, divisor
    value.backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()


def test_round_to_precision_keeps_the_format_mantissa():
    x = torch.randn(10_000) * 1e3
    tf32 = round_to_precision(x, "tf32")
    assert ((tf32.view(torch.int32) & ((1 << 13) - 1)) == 0).all()  # 10 mantissa bits left
    assert ((tf32 - x).abs() <= x.abs() * 2.0**-11).all()
    assert torch.equal(round_to_precision(tf32, "tf32"), tf32)
    assert torch.equal(round_to_precision(x, "bf16"), x.bfloat16().float())
    assert round_to_precision(x, "fp32") is x


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_emulated_precisions_stay_within_the_issue_bounds(precision):
    h, _ = correlated(n=700, p=64, seed=4)
    ref_x = h.double().requires_grad_()
    ref = cov_l1_lowmem(ref_x)
    ref.backward()
    errors = {}
    for prec in ("fp32", precision):
        x = h.clone().requires_grad_()
        value = cov_l1_lowmem(x, precision=prec, emulate=True, chunk=128)
        value.backward()
        errors[prec] = (abs(value.item() - ref.item()) / ref.item(),
                        float((x.grad.double() - ref_x.grad).norm() / ref_x.grad.norm()))
    value_err, grad_err = errors[precision]
    assert value_err <= 1e-4 and grad_err <= 1e-2, errors
    assert grad_err > errors["fp32"][1]  # the emulation does round


def test_precision_resolution():
    assert resolve_precision("auto", "cpu", torch.float32) == "fp32"  # the CPU keeps its exact path
    assert resolve_precision("tf32", "cpu", torch.bfloat16) == "fp32"
    assert resolve_precision("auto", "cuda", torch.float64) == "fp64"
    assert resolve_precision("auto", "cuda", torch.bfloat16) in PRECISIONS
    with pytest.raises(ValueError, match="decorr_precision='fp8'.*choose one of"):
        resolve_precision("fp8", "cpu", torch.float32)


@pytest.mark.parametrize("option,value,message", [
    ("decorr_precision", "fp16", r"decorr_precision='fp16' is not valid; choose one of \['auto', 'fp32', 'tf32'"),
    ("decorr_max_samples", 1, "decorr_max_samples must be 0 .* or an integer >= 2"),
    ("decorr_max_samples", -5, "decorr_max_samples must be 0"),
    ("decorr_chunk_size", 12, "decorr_chunk_size must be 0 .* multiple of 8"),
])
def test_bad_options_fail_at_config_time(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        DecorrTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{option: value})


# ---- through the trainer ---------------------------------------------------------------------------------------


def llama_batch(seed=0, rows=3, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def trainer_for(tmp_path, model, **kw):
    args = DecorrTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], decorr_layers=["all"],
                                   decorr_eval_metrics=False, **kw)
    return DecorrTrainer(model=model, args=args)


def penalty_of(trainer, batch):
    model = trainer.model
    model.train()
    with torch.no_grad():
        task = model(**batch).loss
    return (trainer.compute_loss(model, batch).detach() - task).item() / trainer.args.decorr_weight


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_gradients_match_a_float64_reference(tmp_path, checkpointing):
    batch = llama_batch()
    model = tiny_llama(seed=1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = trainer_for(tmp_path, model, decorr_weight=3.0, decorr_chunk_size=16)
    model.train()
    trainer.compute_loss(model, batch).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_model = tiny_llama(seed=1)
    ref_model.train()
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in ref_model.model.layers]
    loss = ref_model(**batch).loss
    for hook in hooks:
        hook.remove()
    valid = batch["attention_mask"].reshape(-1).bool()
    penalty = sum(reference_cov(o.reshape(-1, o.shape[-1]), valid).abs().sum() / o.shape[-1] ** 2 for o in outputs)
    (loss + 3.0 * penalty.float()).backward()
    for name, param in ref_model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(got[name], param.grad, rtol=2e-4, atol=1e-6)


def test_subsampling_is_reproducible_from_the_seed_and_off_by_default(tmp_path):
    batch = llama_batch(seed=4)  # 3 × 24 positions, 56 valid tokens
    full = penalty_of(trainer_for(tmp_path, tiny_llama(seed=2)), batch)
    a = penalty_of(trainer_for(tmp_path, tiny_llama(seed=2), decorr_max_samples=16, seed=7), batch)
    b = penalty_of(trainer_for(tmp_path, tiny_llama(seed=2), decorr_max_samples=16, seed=7), batch)
    c = penalty_of(trainer_for(tmp_path, tiny_llama(seed=2), decorr_max_samples=16, seed=8), batch)
    everything = penalty_of(trainer_for(tmp_path, tiny_llama(seed=2), decorr_max_samples=72), batch)
    assert a == b and a != c and a != full
    assert abs(everything - full) <= 1e-5 * full  # K ≥ N: every valid token


def test_subsampling_draws_only_valid_tokens(tmp_path):
    # the padding holds a huge value; a drawn padding row would blow the penalty up
    batch = llama_batch(seed=5)
    trainer = trainer_for(tmp_path, tiny_llama(seed=3), decorr_max_samples=8, seed=1)
    model = trainer.model
    layer = model.model.layers[0]
    pad = ~batch["attention_mask"].bool().unsqueeze(-1)
    handle = layer.register_forward_hook(lambda m, a, o: o.masked_fill(pad, 1e4) if torch.is_tensor(o)
                                         else (o[0].masked_fill(pad, 1e4), *o[1:]))
    value = penalty_of(trainer, batch)
    handle.remove()
    assert 0 < value < 1e3


def test_subsampling_path_makes_no_host_sync(tmp_path, monkeypatch):
    class NoSync(DecorrTrainer):
        def decorr_samples(self, layer, output, inputs):
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "numpy"):
                monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(
                    AssertionError("host sync in the penalty path")))
            return super().decorr_samples(layer, output, inputs)

    args = DecorrTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], decorr_layers=["all"],
                                   decorr_eval_metrics=False, decorr_max_samples=16, decorr_chunk_size=8)
    trainer = NoSync(model=tiny_llama(seed=0), args=args)
    trainer.decorr_compact_cpu_tokens = False  # the accelerator path
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, llama_batch())
    monkeypatch.undo()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_precision_option_keeps_the_exact_cpu_path(tmp_path, precision):
    batch = llama_batch(seed=6)
    auto = penalty_of(trainer_for(tmp_path, tiny_llama(seed=4)), batch)
    chosen = penalty_of(trainer_for(tmp_path, tiny_llama(seed=4), decorr_precision=precision), batch)
    assert chosen == auto  # on the CPU every option computes in float32
