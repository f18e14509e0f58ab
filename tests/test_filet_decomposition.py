"""FILet's cheaper exact forms: the svd basis from Gram eigendecompositions, the gram basis of a
wide layer without its n×n V̂, second moments instead of projections, and the decomposition cache."""

import weakref

import pytest
import torch
from conftest import random_batches, tiny_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.methods import filet as filet_module
from fisherlora.methods.filet import (
    DECOMPOSITIONS,
    Candidates,
    DecompositionCache,
    _Projected,
    _SecondMoment,
    _svd_from_gram,
    filet_init,
    layer_candidates,
)

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
    assert max(m, n) >= filet_module.GRAM_EIGH_ASPECT * min(m, n)  # the eigh path
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


def test_second_moments_equal_the_projected_sums():
    torch.manual_seed(1)
    z = torch.randn(200, 24)
    directions = torch.randn(24, 40)
    projected, moment = _Projected(directions), _SecondMoment(directions)
    lift = torch.randn(8, 24)
    p = torch.randn(8, 40)
    lifted_projected, lifted = _Projected(lift.T @ p), _SecondMoment(p, lift=lift)
    projected_lifted = _Projected(p, lift=lift)  # the GPU form of a lifted side
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
    moved = c.to("cpu")
    assert isinstance(moved, Candidates) and moved.v is None and torch.equal(moved.c, c.c)
    assert c.nbytes == sum(t.numel() * 4 for t in (c.u, c.sigma, c.c))


def test_a_model_whose_candidates_do_not_fit_is_decomposed_without_the_cache(monkeypatch):
    DECOMPOSITIONS.clear()
    monkeypatch.setattr(DECOMPOSITIONS, "max_bytes", 1000)  # smaller than the tiny model's
    filet_init(tiny_peft_model("bert", seed=8), random_batches(2), progress=False)
    assert len(DECOMPOSITIONS) == 0 and DECOMPOSITIONS.misses == 0  # no hashing, no thrashing
