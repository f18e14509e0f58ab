"""CUDA paths (#17), skipped where torch sees no GPU: the runner trains at every precision with
float32 master weights and reports the GPU's peak memory; data-driven inits keep the outputs and
put every adapter on the model's device."""

import copy

import pytest
import torch
from conftest import logits, random_batches, tiny_base, tiny_lora_config

from fisherlora.experiments.train import TrainConfig, train
from fisherlora.methods import get_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on(batches, device):
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_runner_trains_on_cuda_at_each_precision(precision, keyword_task):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    config = TrainConfig(
        model="tiny-bert",
        method="fw-lora",  # warm-up hooks under autocast, and the GradScaler at fp16
        steps=12,
        batch_size=16,
        lr=1e-2,
        eval_every=6,
        max_length=16,
        fw_warmup_steps=4,
        device="cuda",
        precision=precision,
    )
    result = train(config, task=keyword_task, progress=False)
    assert result.curve["train_loss"].notna().all()
    assert result.metrics["nll"] < 10
    assert result.metrics["timings"]["peak_memory_mb"] > 0  # torch.cuda.max_memory_allocated
    for name, param in result.model.named_parameters():
        assert param.device.type == "cuda" and param.dtype == torch.float32, name


@pytest.mark.parametrize("name", ["pissa", "lora-ga", "filet", "fim-lora"])
def test_inits_on_cuda_keep_the_outputs_and_the_device(name):
    device = torch.device("cuda")
    base, targets = tiny_base("bert", seed=3)
    base.eval().to(device)
    original = copy.deepcopy(base)
    batches = on(random_batches(8, batch_size=4, seq=12, seed=5), device)
    method = get_method(name, {"calib_batches": 8, "steps": 20})
    model = method.build(base, tiny_lora_config(targets, 4), batches)
    method.prepare(model, batches)
    # float32 on the GPU (TF32 matmuls are off by default): the init moves no output
    torch.testing.assert_close(logits(model, batches), logits(original, batches), atol=1e-4, rtol=0)
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapters
    for param_name, param in adapters.items():  # resized / re-initialised adapters included
        assert param.device.type == "cuda" and param.dtype == torch.float32, param_name
    if name in ("pissa", "lora-ga", "filet"):  # they did initialise B away from zero
        assert any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)


@pytest.mark.parametrize("basis", ["gram", "svd"])
def test_filet_candidates_on_cuda_batched_equal_the_cpu_ones(basis):
    # On a GPU the same-shape layers are decomposed as one stack, and the svd basis comes from
    # the float64 Gram eigendecomposition for every shape (torch.linalg.svd is slow there).
    from fisherlora.directions import many_layer_candidates

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(m, n, generator=generator) for m, n in [(32, 32), (64, 16)] * 3]
    cpu = many_layer_candidates(weights, basis)
    gpu = many_layer_candidates([w.cuda() for w in weights], basis)
    for a, b in zip(gpu, cpu, strict=True):
        assert a.u.device.type == "cuda"
        torch.testing.assert_close(a.sigma.cpu(), b.sigma, rtol=1e-4, atol=1e-5)
        signs = torch.sign((a.u.cpu() * b.u).sum(dim=0))  # an eigensolver may flip a sign
        torch.testing.assert_close(a.u.cpu(), b.u * signs, rtol=1e-3, atol=1e-4)
