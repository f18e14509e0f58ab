"""Mixed precision: statistics and residuals in float32 on bf16 models; FW-LoRA's proxy does not
depend on an fp16 GradScaler's loss scale, and overflowed steps are skipped as the scaler does."""

import pytest
import torch
from conftest import logits, random_batches, tiny_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.errors import CalibrationError
from fisherlora.methods.filet import filet_init
from fisherlora.methods.fim_lora import fisher_of_b
from fisherlora.methods.fw_lora import FisherPenalty


def bf16_model(seed=0):
    model = tiny_peft_model("llama", seed=seed)
    model.get_base_model().to(torch.bfloat16)
    return model


def test_statistics_and_residuals_are_float32_on_a_bf16_model():
    model = bf16_model()
    batches = random_batches(2, seed=1)
    fisher, _ = fisher_of_b(model, batches, progress=False)
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in fisher.values())
    adapter, layers = lora_layers(model)
    for layer in layers.values():  # float32 adapters on a bf16 base, as get_peft_model makes them
        layer.lora_A.float(), layer.lora_B.float()
    before = logits(model, batches).float()
    weights = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    report = filet_init(model, batches, progress=False)
    assert all(max(e) > 0 for e in report.energies.values())
    for name, layer in layers.items():
        residual = layer.get_base_layer().weight
        assert residual.dtype == torch.bfloat16
        # W_res = W − s B A is formed in float32 from the bf16 W and rounded to bf16 once
        update = layer.scaling[adapter] * (
            layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
        )
        assert torch.equal(residual, (weights[name].float() - update).to(torch.bfloat16)), name
    # and so the bf16 outputs move by rounding only
    torch.testing.assert_close(logits(model, batches).float(), before, atol=3e-2, rtol=0)


def run_penalty(scale: float | None, batches):
    model = tiny_peft_model("llama", seed=3)  # no dropout: both runs see the same gradients
    # the scale doubles after every step, so a stale scale would show
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1) if scale else None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    penalty = FisherPenalty(model, warmup_steps=10, grad_scaler=scaler)
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            penalty.step()
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
            penalty.step()
        optimizer.zero_grad(set_to_none=True)
    if scaler:
        assert scaler.get_scale() == scale * 2 ** len(batches)
    return penalty


def test_fw_lora_proxy_does_not_depend_on_the_loss_scale():
    batches = random_batches(3, seed=4)
    plain, scaled = run_penalty(None, batches), run_penalty(2.0**12, batches)
    assert scaled.fisher.tolist() == pytest.approx(plain.fisher.tolist(), rel=1e-5)


def test_overflowed_step_is_skipped_under_a_scaler_and_an_error_without():
    batches = random_batches(2, seed=5)
    for scale in (2.0**10, None):
        model = tiny_peft_model("llama", seed=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        penalty = FisherPenalty(model, warmup_steps=10, grad_scaler=scaler)
        first = model(**batches[0]).loss
        (scaler.scale(first) if scaler else first).backward()
        penalty.step()
        fisher_after_one = penalty.fisher.clone()
        overflow = model.base_model.model.score.register_forward_hook(lambda m, i, o: o * 1e38)
        loss = model(**batches[1]).loss * 1e38
        overflow.remove()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            penalty.step()
            assert penalty.skipped_steps == 1 and torch.equal(penalty.fisher, fisher_after_one)
        else:
            state = (penalty.step_count, penalty.skipped_steps, penalty.warming_up)
            importance, proxy = penalty.importance_.clone(), dict(penalty.last_proxy)
            with pytest.raises(CalibrationError, match="non-finite frozen-weight gradient norm"):
                penalty.step()
            # refused, and the penalty's schedule is as it was: F, I, step count, skipped
            # steps, the warm-up flag and its hooks, the proxy it last recorded
            assert state == (1, 0, True)
            assert (penalty.step_count, penalty.skipped_steps, penalty.warming_up) == state
            assert torch.equal(penalty.fisher, fisher_after_one)
            assert torch.equal(penalty.importance_, importance) and penalty.last_proxy == proxy
            assert len(penalty._handles) == len(penalty.names)


def test_a_refused_non_finite_step_does_not_poison_the_next_one():
    batches = random_batches(3, seed=5)
    model = tiny_peft_model("llama", seed=3)
    penalty = FisherPenalty(model, warmup_steps=10)
    model(**batches[0]).loss.backward()
    penalty.step()
    model.zero_grad()
    overflow = model.base_model.model.score.register_forward_hook(lambda m, i, o: o * 1e38)
    (model(**batches[1]).loss * 1e38).backward()
    overflow.remove()
    model.zero_grad()
    with pytest.raises(CalibrationError, match="non-finite frozen-weight gradient norm"):
        penalty.step()
    model(**batches[2]).loss.backward()  # a clean step after the refused one (batch skipped)
    penalty.step()
    assert penalty.step_count == 2 and torch.isfinite(penalty.fisher).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fw_lora_statistics_stay_float32_under_autocast(dtype):
    """The runner's --precision bf16/fp16 runs the forward passes under autocast: the warm-up
    hooks' products are formed in float32 all the same (they used to come out in half precision
    and fail against float32 gradients in backward)."""
    batches = random_batches(2, seed=4)
    penalties = []
    for autocast_dtype in (None, dtype):
        model = tiny_peft_model("llama", seed=3)
        penalty = FisherPenalty(model, warmup_steps=10)
        for batch in batches:
            with torch.autocast("cpu", dtype=dtype, enabled=autocast_dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            assert all(term.dtype == torch.float32 for term in penalty._pending.values())
            penalty.step()
            model.zero_grad(set_to_none=True)
        penalties.append(penalty)
    plain, autocast = penalties
    # the same statistic, up to the half-precision activations and gradients
    assert autocast.fisher.tolist() == pytest.approx(plain.fisher.tolist(), rel=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fw_lora_penalty_is_float32_inside_autocast(dtype):
    """A Trainer's compute_loss runs under autocast: the penalty's r×r products stay float32
    there (same value and gradients as outside it)."""
    model = tiny_peft_model("llama", seed=3)
    penalty = FisherPenalty(model, warmup_steps=0, lam=0.5)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():  # B ≠ 0, so the penalty and its gradients are not zero
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    value = penalty.penalty()
    expected = torch.autograd.grad(value, params)
    with torch.autocast("cpu", dtype=dtype):
        inside = penalty.penalty()
    assert inside.dtype == torch.float32 and value.item() > 0
    assert inside.item() == pytest.approx(value.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(inside, params), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
