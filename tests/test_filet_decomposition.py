"""FILet's cheaper exact forms: the svd basis from Gram eigendecompositions, the gram basis of a
wide layer without its n×n V̂, second moments instead of projections, and the decomposition cache."""

import weakref

import pytest
import torch
from conftest import random_batches, tiny_peft_model

from fisherlora import directions as directions_module
from fisherlora.adapters import lora_layers
from fisherlora.directions import (
    DECOMPOSITIONS,
    Candidates,
    DecompositionCache,
    _svd_from_gram,
    layer_candidates,
    many_layer_candidates,
)
from fisherlora.methods import filet as filet_module
from fisherlora.methods.filet import filet_init
from fisherlora.stats import ProjectedSquares, SecondMoment

pytestmark = pytest.mark.filterwarnings("ignore:the calibration loader ran out")


def spectrum(m, n, rank=None, seed=0):
    """A random m×n matrix with distinct, spread singular values (rank ``rank`` if given)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    sigma = torch.logspace(0, -3, k)
    if rank is not None:
        sigma[rank:] = 0
    return (u * sigma) @ v.T


@pytest.mark.parametrize(("m", "n"), [(96, 24), (24, 96), (40, 40)])
def test_gram_eigendecomposition_gives_the_svd(m, n):
    w = spectrum(m, n)
    u, sigma, v = _svd_from_gram(w)
    u_ref, sigma_ref, vh_ref = torch.linalg.svd(w.double(), full_matrices=False)
    torch.testing.assert_close(sigma.double(), sigma_ref, rtol=0, atol=1e-6 * sigma_ref[0])
    # the same singular vectors up to sign (the singular values are distinct)
    torch.testing.assert_close(
        (u.double().T @ u_ref).diagonal().abs(),
        torch.ones(min(m, n), dtype=torch.float64),
        rtol=0,
        atol=1e-4,
    )
    torch.testing.assert_close(
        (v.double().T @ vh_ref.T).diagonal().abs(),
        torch.ones(min(m, n), dtype=torch.float64),
        rtol=0,
        atol=1e-4,
    )
    torch.testing.assert_close((u * sigma) @ v.T, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("m", "n"), [(12, 40), (40, 12)])
def test_svd_candidates_of_a_long_weight_come_from_the_gram_matrix_and_drop_its_null_space(m, n):
    w = spectrum(m, n, rank=3)
    assert max(m, n) >= directions_module.GRAM_EIGH_ASPECT * min(m, n)  # the eigh path
    c = layer_candidates(w, "svd")
    assert c.sigma.numel() == 3 and c.v is not None
    torch.testing.assert_close(c.v.T @ c.v, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.u.T @ c.u, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(w @ c.v, c.u * c.sigma, atol=1e-6, rtol=0)


def test_gram_candidates_of_a_wide_layer_equal_the_explicit_formula_without_forming_v():
    torch.manual_seed(0)
    w = torch.randn(16, 64)  # m (m + n) < n²: V̂ = Wᵀ C, never formed
    c = layer_candidates(w, "gram")
    assert c.v is None and c.c.shape == (16, 64)
    gram = (w.T @ w).double()
    v = gram / gram.norm(dim=0)
    wv = w.double() @ v
    torch.testing.assert_close(c.right(w).double(), v, rtol=0, atol=1e-5)
    torch.testing.assert_close(c.sigma.double(), wv.norm(dim=0), rtol=1e-5, atol=0)
    torch.testing.assert_close(c.u.double(), wv / wv.norm(dim=0), rtol=0, atol=1e-5)
    square = layer_candidates(torch.randn(32, 32), "gram")
    assert square.v is not None and square.c is None


def same_candidates(a: Candidates, b: Candidates, atol: float) -> None:
    """Equal candidates up to each direction's sign (an eigensolver may flip one)."""
    assert a.sigma.shape == b.sigma.shape
    torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-5, atol=atol)
    for name in ("u", "v", "c"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            signs = torch.sign((x * y).sum(dim=0))
            torch.testing.assert_close(x, y * signs, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("basis", ["gram", "svd"])
@pytest.mark.parametrize("svd_by_eigh", [None, True])
def test_batched_decomposition_equals_one_layer_at_a_time(basis, svd_by_eigh, monkeypatch):
    # Square, tall and wide layers, several of each shape (one stack per shape), a rank-deficient
    # one (its own number of usable candidates), in a mixed order that must be kept.
    shapes = [(24, 24), (48, 16), (24, 24), (16, 48), (48, 16), (24, 24), (16, 48)]
    weights = [spectrum(m, n, seed=i) for i, (m, n) in enumerate(shapes)]
    weights[2] = spectrum(24, 24, rank=5, seed=9)
    one_by_one = [layer_candidates(w, basis, svd_by_eigh) for w in weights]
    for chunk_bytes in (1 << 30, 1):  # one stack per shape; one layer per stack
        monkeypatch.setattr(directions_module, "BATCHED_DECOMPOSITION_BYTES", chunk_bytes)
        batched = many_layer_candidates(weights, basis, batched=True, svd_by_eigh=svd_by_eigh)
        assert [c.sigma.numel() for c in batched] == [c.sigma.numel() for c in one_by_one]
        for a, b in zip(batched, one_by_one, strict=True):
            same_candidates(a, b, atol=1e-5)


def test_decomposition_is_not_batched_on_a_cpu_by_default(monkeypatch):
    # On a CPU a stack gains nothing (the batched LAPACK calls loop over the layers), and the
    # one-layer path keeps every CPU result bit-identical to before the batched path existed.
    weights = [spectrum(24, 24, seed=s) for s in range(3)]
    monkeypatch.setattr(directions_module, "_decompose", lambda *a: pytest.fail("stacked"))
    monkeypatch.setattr(
        directions_module,
        "layer_candidates",
        lambda w, basis, eigh=None: Candidates(u=w, sigma=w[0]),
    )
    out = many_layer_candidates(weights, "svd")
    assert [c.u is w for c, w in zip(out, weights, strict=True)] == [True] * 3


def test_second_moments_equal_the_projected_sums():
    torch.manual_seed(1)
    z = torch.randn(200, 24)
    directions = torch.randn(24, 40)
    projected, moment = ProjectedSquares(directions), SecondMoment(directions)
    lift = torch.randn(8, 24)
    p = torch.randn(8, 40)
    lifted_projected, lifted = ProjectedSquares(lift.T @ p), SecondMoment(p, lift=lift)
    projected_lifted = ProjectedSquares(p, lift=lift)  # the GPU form of a lifted side
    for chunk in z.split(50):
        for stat in (projected, moment, lifted_projected, lifted, projected_lifted):
            stat.add(chunk)
    torch.testing.assert_close(moment.result(), projected.result(), rtol=1e-5, atol=0)
    torch.testing.assert_close(lifted.result(), lifted_projected.result(), rtol=1e-4, atol=0)
    torch.testing.assert_close(projected_lifted.result(), lifted.result(), rtol=1e-4, atol=0)


def test_cache_hit_returns_the_same_decomposition_and_a_changed_weight_misses():
    cache = DecompositionCache(max_bytes=1 << 30)
    w = spectrum(48, 16)
    computed = []

    def compute(weight=w):
        computed.append(1)
        return layer_candidates(weight, "svd")

    first = cache.get(w, "svd", compute)
    again = cache.get(w.clone(), "svd", compute)  # equal bytes, another tensor: a hit
    assert (len(computed), cache.hits, cache.misses) == (1, 1, 1)
    for name in ("u", "sigma", "v"):
        assert torch.equal(getattr(again, name), getattr(first, name))
    changed = w.clone()
    changed[3, 5] = torch.nextafter(changed[3, 5], torch.tensor(2.0))  # one bit
    cache.get(changed, "svd", lambda: compute(changed))
    cache.get(w, "gram", lambda: layer_candidates(w, "gram"))  # another basis: another entry
    assert (len(computed), cache.misses, len(cache)) == (2, 3, 3)


def test_cache_is_bounded_least_recently_used_first_holds_no_weight_and_can_be_off():
    weights = [spectrum(32, 32, seed=s) for s in range(4)]
    one = layer_candidates(weights[0], "svd").nbytes
    cache = DecompositionCache(max_bytes=2 * one)
    for w in weights[:3]:
        cache.get(w, "svd", lambda w=w: layer_candidates(w, "svd"))
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    cache.get(weights[2], "svd", lambda: pytest.fail("the newest entry was evicted"))
    probe = weakref.ref(weights[3])
    cache.get(weights[3], "svd", lambda: layer_candidates(weights[3], "svd"))
    del weights[3]
    assert probe() is None  # the cache keeps no reference to the weight
    for entry in cache._entries.values():
        assert entry.u.device.type == "cpu"
    off = DecompositionCache(max_bytes=0)
    off.get(weights[0], "svd", lambda: layer_candidates(weights[0], "svd"))
    assert len(off) == 0 and off.misses == 0


def test_filet_init_with_and_without_the_cache_agree_and_repeats_hit():
    batches = random_batches(3, seed=6)
    DECOMPOSITIONS.clear()
    fresh = tiny_peft_model("llama", seed=7)
    report = filet_init(fresh, batches, cache=False, progress=False)
    assert len(DECOMPOSITIONS) == 0
    cached = []
    for _ in range(2):
        model = tiny_peft_model("llama", seed=7)
        cached.append((model, filet_init(model, batches, progress=False)))
    layers = len(lora_layers(fresh)[1])
    assert DECOMPOSITIONS.misses == layers and DECOMPOSITIONS.hits == layers
    reference = dict(fresh.named_parameters())
    for model, other in cached:
        assert other.selected == report.selected
        for name, value in model.named_parameters():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    DECOMPOSITIONS.clear()


def test_candidates_move_between_devices_whole():
    c = layer_candidates(torch.randn(8, 40), "gram")
    moved = c.to("meta")  # a device that every machine has
    assert isinstance(moved, Candidates) and moved.v is None
    for name in ("u", "sigma", "c"):
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(moved, name).shape == getattr(c, name).shape, name
    assert c.c.device.type == "cpu"  # a copy: c itself stays
    assert c.nbytes == sum(t.numel() * 4 for t in (c.u, c.sigma, c.c))


def test_a_model_whose_candidates_do_not_fit_is_decomposed_without_the_cache(monkeypatch):
    DECOMPOSITIONS.clear()
    monkeypatch.setattr(DECOMPOSITIONS, "max_bytes", 1000)  # smaller than the tiny model's
    filet_init(tiny_peft_model("bert", seed=8), random_batches(2), progress=False)
    assert len(DECOMPOSITIONS) == 0 and DECOMPOSITIONS.misses == 0  # no hashing, no thrashing


def test_a_lifted_side_takes_w_x_from_the_base_output_with_the_lift_from_x_result():
    """A wide layer's p_i = c_iᵀ S_{Wx} c_i reads W x = y − b off the frozen base layer's output
    (no lift product); the sums equal those of the lift from x, and the hooks leave nothing."""
    from fisherlora.capture import run_passes
    from fisherlora.methods.filet import CandidateEnergies

    model = tiny_peft_model("llama", seed=9)
    adapter, layers = lora_layers(model)
    for layer in layers.values():  # a bias, so that y − b is tested
        base = layer.get_base_layer()
        base.bias = torch.nn.Parameter(torch.randn(base.out_features), requires_grad=False)
    candidates = {
        n: layer_candidates(layer.get_base_layer().weight, "gram") for n, layer in layers.items()
    }
    lifted = [n for n, c in candidates.items() if c.v is None]
    assert lifted  # the tiny Llama's down_proj is wide
    batches = random_batches(2, seed=3)
    b_weights = [layer.lora_B[adapter].weight for layer in layers.values()]

    def collect(from_output: bool) -> CandidateEnergies:
        statistic = CandidateEnergies(layers, candidates)
        used = []
        if from_output:
            keep = statistic._keep_base_output

            def spy(name, *args):
                used.append(name)
                keep(name, *args)

            statistic._keep_base_output = spy
        else:
            statistic._keep_base_output = lambda *a: None
        run_passes(model, b_weights, batches, 2, torch.device("cpu"), [statistic], progress=False)
        if from_output:
            assert set(used) == set(lifted)
        assert not statistic._base_outputs
        return statistic

    via_output, via_lift = collect(True).sums(), collect(False).sums()
    for name in layers:
        for a, b in zip(via_output[name], via_lift[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_tall_layer_reads_q_off_its_input_gradient_with_the_direct_result(arch, monkeypatch):
    """û_iᵀ g = v̂_iᵀ (Wᵀ g) / σ_i: a tall layer's q_i from the gradient of its base layer's
    input equal the projections of g (the first layer's input takes no gradient there: that call
    projects g); the outputs and gradients of the model are untouched, no hook is left."""
    from contextlib import nullcontext

    from fisherlora.capture import calibration_mode, run_passes
    from fisherlora.methods.filet import CandidateEnergies

    model = tiny_peft_model(arch, seed=12)
    adapter, layers = lora_layers(model)
    candidates = {
        n: layer_candidates(layer.get_base_layer().weight, "gram") for n, layer in layers.items()
    }
    batches = random_batches(2, seed=4)
    b_weights = [layer.lora_B[adapter].weight for layer in layers.values()]

    def collect() -> tuple[CandidateEnergies, dict]:
        statistic = CandidateEnergies(layers, candidates)
        run_passes(model, b_weights, batches, 2, torch.device("cpu"), [statistic], progress=False)
        assert not statistic._reading_input_grad
        return statistic, statistic.sums()

    with_input, via_input = collect()
    tall = [n for n, layer in layers.items() if layer.get_base_layer().weight.shape[0] > 32]
    assert tall and set(with_input.input_grad_sides) == set(tall)
    assert all(side.sums.any() for side in with_input.input_grad_sides.values())
    monkeypatch.setattr(filet_module, "_reads_input_grads", lambda *a: False)
    without, direct = collect()
    assert not without.input_grad_sides
    for name in layers:
        for a, b in zip(via_input[name], direct[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())

    def logits_and_grads(statistic: CandidateEnergies | None) -> list[torch.Tensor]:
        with calibration_mode(model, b_weights), statistic.hooks() if statistic else nullcontext():
            if statistic:
                statistic.start_batch(batches[0])
            out = model(**batches[0])
            out.loss.backward()
            return [out.logits.detach()] + [w.grad.clone() for w in b_weights]

    monkeypatch.undo()
    hooked, plain = logits_and_grads(CandidateEnergies(layers, candidates)), logits_and_grads(None)
    for a, b in zip(hooked, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_tall_layer_with_small_gains_projects_the_output_gradient():
    """Where a candidate's σ_i falls below INPUT_GRAD_MIN_GAIN σ_max (the error of the input
    gradient form grows as σ_max / σ_i), and for half weights, g is projected directly."""
    from fisherlora.methods.filet import _reads_input_grads

    spread = spectrum(48, 16, seed=2)  # σ from 1 to 1e-3
    even = torch.linalg.qr(torch.randn(48, 16)).Q  # every σ = 1
    assert not _reads_input_grads(spread, layer_candidates(spread, "svd"))
    assert _reads_input_grads(even, layer_candidates(even, "svd"))
    assert not _reads_input_grads(even.half(), layer_candidates(even, "svd"))
    assert not _reads_input_grads(even.T, layer_candidates(even.T, "svd"))  # wide: no gain


def test_statistics_take_the_cheaper_form_for_the_calibration_token_count():
    # 2 dim (T + k) < T k: second moments for many tokens, projections for few; none known: moments
    assert filet_module._moments_cheaper(384, 1536, 6400)  # MiniLM's wide layer, 8 × 32 sentences
    assert not filet_module._moments_cheaper(2048, 5632, 2048)  # a 2048-wide down projection
    assert filet_module._moments_cheaper(16, 64, None)
    assert not filet_module._moments_cheaper(64, 64, None)  # dim ≥ k: projections always

    class Wide:  # what CandidateEnergies reads of a LoRA layer: its base layer's weight
        base = torch.nn.Linear(64, 16, bias=False)

        def get_base_layer(self):
            return self.base

    name, wide = "wide", {"wide": Wide()}
    candidates = {name: layer_candidates(Wide.base.weight, "gram")}
    assert candidates[name].v is None and candidates[name].sigma.numel() > 16  # the lifted form
    kinds = {}
    for tokens in (None, 10**6, 1):
        statistic = filet_module.CandidateEnergies(wide, candidates, "gram", tokens)
        kinds[tokens] = [type(side).__name__ for side in statistic.sides[name]]
    assert kinds[None] == kinds[10**6] == ["SecondMoment", "SecondMoment"]
    assert kinds[1] == ["ProjectedSquares", "ProjectedSquares"]
    batches = random_batches(2)
    assert filet_module._calibration_tokens(batches) == sum(
        int(b["attention_mask"].sum()) for b in batches
    )
    assert filet_module._calibration_tokens([{"input_ids": batches[0]["input_ids"]}]) is None
    assert filet_module._calibration_tokens([tuple(batches[0].values())]) is None  # no mapping
