"""Candidate directions of a frozen weight, FILet's step 1 (:mod:`fisherlora.methods.filet`).

For ``W ∈ R^{m×n}`` the candidates are pairs ``(v̂_i, û_i)`` with gains ``σ_i = ‖W v̂_i‖``:

- ``basis="gram"`` (the paper): ``V̂ = normalize_columns(WᵀW)``, ``Û = normalize_columns(W V̂)``
  (unit-norm, not orthogonal, at most ``min(m, n)`` independent). Where ``m (m + n) < n²``,
  ``V̂ = WᵀW D⁻¹ = Wᵀ C`` with ``C = W D⁻¹`` is kept as C (m×k) and never formed.
- ``basis="svd"``: the orthonormal singular vectors of ``W = U Σ Vᵀ``, from the
  eigendecomposition of the smaller Gram matrix (``WᵀW`` or ``WWᵀ``) in float64 where W is at
  least :data:`GRAM_EIGH_ASPECT` times longer than wide, or on a GPU, and
  :func:`torch.linalg.svd` otherwise.

Candidates with ``σ_i`` below :data:`DEGENERATE` of the largest are dropped. The candidates of
a weight already seen in this process come from :data:`DECOMPOSITIONS`, a bounded cache keyed by
a hash of the weight's bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

DEGENERATE = 1e-6  # a candidate with σ_i below this fraction of the layer's largest is dropped
# The svd basis comes from an eigendecomposition of the smaller Gram matrix (float64) when W is
# at least this many times longer than wide: measured on MiniLM's 384×1536 layers (2-core CPU) it
# took half the time of torch.linalg.svd, on its 384×384 ones longer.
GRAM_EIGH_ASPECT = 2
# A batched decomposition (many_layer_candidates) stacks at most about this many bytes of
# same-shape layers at once, so that batching never holds many layers' workspaces on a big model.
BATCHED_DECOMPOSITION_BYTES = 512 << 20


@dataclass(frozen=True)
class Candidates:
    """One layer's candidates (module docstring, step 1): ``û_i``, the columns of ``u`` [m, k];
    ``σ_i = ‖W v̂_i‖`` [k]; and ``v̂_i``, the columns of ``v`` [n, k] or, where ``v`` is None, of
    ``Wᵀ c`` (``c`` [m, k]): the gram candidates of a layer with ``m (m + n) < n²``, whose n×n
    ``V̂ = WᵀW D⁻¹ = Wᵀ (W D⁻¹)`` is never formed."""

    u: torch.Tensor
    sigma: torch.Tensor
    v: torch.Tensor | None = None
    c: torch.Tensor | None = None

    def right(self, weight: torch.Tensor, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The right directions ``v̂_i`` of the candidates ``idx`` as columns, float32."""
        if self.v is not None:
            return self.v[:, idx]
        return weight.detach().float().T @ self.c[:, idx]

    def to(self, device: torch.device | str) -> Candidates:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Candidates(**{k: None if t is None else t.to(device) for k, t in moved.items()})

    @property
    def nbytes(self) -> int:
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _svd_from_gram(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, σ, V`` of ``W`` [..., m, n] (one weight or a stack of same-shape weights) from the
    eigendecomposition of its smaller Gram matrix in float64 (``WᵀW = V Σ² Vᵀ`` and
    ``U = W V Σ⁻¹`` for a tall W; ``WWᵀ`` for a wide one), σ descending as
    :func:`torch.linalg.svd` gives them. float64 keeps ``σ_i`` accurate to ~1e-8 ``σ_max`` (the
    squared condition number of the Gram matrix would cost float32 its small ones)."""
    w64 = w.double()
    tall = w64.shape[-2] >= w64.shape[-1]
    gram = w64.mT @ w64 if tall else w64 @ w64.mT
    lam, vecs = torch.linalg.eigh(gram)
    lam, vecs = lam.flip(-1), vecs.flip(-1)
    sigma = lam.clamp_min(0).sqrt()
    tiny = torch.finfo(w64.dtype).tiny
    other = (w64 @ vecs if tall else w64.mT @ vecs) / sigma.clamp_min(tiny).unsqueeze(-2)
    u, v = (other, vecs) if tall else (vecs, other)
    return u.float(), sigma.float(), v.float()


def _decompose(
    w: torch.Tensor, basis: str, svd_by_eigh: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``u, σ, v, c`` of :class:`Candidates` before degenerate candidates are dropped, for one
    float32 weight [m, n] or a stack [L, m, n] of same-shape weights (one batched call per
    operation: on a GPU one kernel for all L layers instead of L). ``svd_by_eigh`` (svd basis):
    the float64 Gram eigendecomposition instead of :func:`torch.linalg.svd`; by default where W
    is ≥ :data:`GRAM_EIGH_ASPECT` times longer than wide, and for every shape on a GPU, where
    ``torch.linalg.svd`` of a small matrix is slow."""
    m, n = w.shape[-2:]
    tiny = torch.finfo(w.dtype).tiny
    v = c = None
    if basis == "svd":
        if svd_by_eigh is None:
            svd_by_eigh = w.device.type == "cuda" or max(m, n) >= GRAM_EIGH_ASPECT * min(m, n)
        if svd_by_eigh:
            u, sigma, v = _svd_from_gram(w)
        else:
            u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
            v = vh.mT
        return u, sigma, v, c
    if m * (m + n) < n * n:
        # V̂ = WᵀW D⁻¹ = Wᵀ C with C = W D⁻¹, d_i = ‖WᵀW e_i‖ = √(w_iᵀ WWᵀ w_i), and
        # W V̂ = (WWᵀ) W D⁻¹: m²n work instead of mn², and V̂ (n×n) is never formed.
        wwt_w = (w @ w.mT) @ w
        d = (w * wwt_w).sum(dim=-2, keepdim=True).clamp_min(0).sqrt().clamp_min(tiny)
        c, wv = w / d, wwt_w / d
    else:
        gram = w.mT @ w
        v = gram / torch.linalg.vector_norm(gram, dim=-2, keepdim=True).clamp_min(tiny)
        wv = w @ v
    sigma = torch.linalg.vector_norm(wv, dim=-2)
    u = wv / sigma.clamp_min(tiny).unsqueeze(-2)
    return u, sigma, v, c


def _keep_usable(
    u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor | None, c: torch.Tensor | None
) -> Candidates:
    """One layer's :class:`Candidates` without the degenerate ones (``‖W v̂‖ ≈ 0``)."""
    keep = sigma > DEGENERATE * sigma.max()
    return Candidates(
        u=u[:, keep].contiguous(),
        sigma=sigma[keep],
        v=None if v is None else v[:, keep].contiguous(),
        c=None if c is None else c[:, keep].contiguous(),
    )


def layer_candidates(
    weight: torch.Tensor, basis: str, svd_by_eigh: bool | None = None
) -> Candidates:
    """The :class:`Candidates` of a weight (computed in float32; svd via float64 Gram matrices
    where cheaper, see :func:`_decompose`)."""
    return _keep_usable(*_decompose(weight.detach().float(), basis, svd_by_eigh))


def many_layer_candidates(
    weights: Sequence[torch.Tensor],
    basis: str,
    *,
    batched: bool | None = None,
    svd_by_eigh: bool | None = None,
) -> list[Candidates]:
    """:func:`layer_candidates` of every weight; with ``batched`` (default: on a GPU) the
    weights of one shape, dtype and device are decomposed as one stack, one batched call per
    operation, in groups of at most :data:`BATCHED_DECOMPOSITION_BYTES` of float64 Gram matrices."""
    if batched is None:
        batched = any(w.device.type == "cuda" for w in weights)
    out: list[Candidates | None] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        key = (tuple(w.shape), w.dtype, w.device) if batched else (i,)
        groups.setdefault(key, []).append(i)
    for indices in groups.values():
        m, n = weights[indices[0]].shape
        per_layer = 8 * min(m, n) ** 2 + 4 * m * n * 3  # the Gram matrix and a few m×n copies
        size = max(1, BATCHED_DECOMPOSITION_BYTES // per_layer)
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            if len(chunk) == 1:
                out[chunk[0]] = layer_candidates(weights[chunk[0]], basis, svd_by_eigh)
                continue
            stack = torch.stack([weights[i].detach().float() for i in chunk])
            u, sigma, v, c = _decompose(stack, basis, svd_by_eigh)
            for j, i in enumerate(chunk):
                out[i] = _keep_usable(
                    u[j], sigma[j], None if v is None else v[j], None if c is None else c[j]
                )
    return out  # type: ignore[return-value]


def candidate_directions(
    weight: torch.Tensor, basis: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right directions ``V̂`` [n, k], left directions ``Û`` [m, k] and ``σ_i = ‖W v̂_i‖`` [k]."""
    candidates = layer_candidates(weight, basis)
    return candidates.right(weight), candidates.u, candidates.sigma


class DecompositionCache:
    """The candidates of base weights already decomposed in this process, so that repeated FILet
    inits on one base (the methods and seeds of a comparison, the runs of a suite) do not
    decompose its weights again.

    Keyed by the basis and a SHA-1 of the weight's bytes (with its shape and dtype): a weight that
    changed in any bit misses. Entries are CPU tensors (on a CPU run the very tensors FILet used,
    shared read-only; moved to the weight's device on a hit), evicted least recently used first
    so that they hold at most ``max_bytes`` (an entry larger than that is not kept);
    ``max_bytes = 0`` turns the cache off. It holds no reference to a weight or a model.
    :func:`filet_init` uses it only for a model all of whose candidates fit (MiniLM's 37 target
    layers: ≈ 75 MB gram, ≈ 64 MB svd); a larger model (a 7B Llama's are tens of GB) is
    decomposed afresh every time, without hashing its weights or filling the cache. Hashing reads
    every target weight once (≈ 30 ms for MiniLM's 43 MB on a 2-core CPU).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, Candidates] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(weight: torch.Tensor, basis: str) -> tuple:
        data = weight.detach().contiguous().cpu()
        digest = hashlib.sha1(data.view(torch.uint8).numpy(), usedforsecurity=False).hexdigest()
        return (basis, tuple(data.shape), str(data.dtype), digest)

    def lookup(self, key: tuple, device: torch.device) -> Candidates | None:
        """The candidates cached under ``key`` (:meth:`key`) on ``device``, or None (a miss)."""
        if key not in self._entries:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return self._entries[key].to(device)

    def put(self, key: tuple, candidates: Candidates) -> None:
        """Keep ``candidates`` under ``key`` if they fit, evicting the least recently used."""
        if candidates.nbytes > self.max_bytes:
            return
        self._entries[key] = candidates.to("cpu")
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def get(
        self, weight: torch.Tensor, basis: str, compute: Callable[[], Candidates]
    ) -> Candidates:
        """The cached candidates of ``weight``, or ``compute()``'s (then kept, if they fit)."""
        if self.max_bytes <= 0:
            return compute()
        key = self.key(weight, basis)
        hit = self.lookup(key, weight.device)
        if hit is not None:
            return hit
        candidates = compute()
        self.put(key, candidates)
        return candidates

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0


# The process's cache; its size in MiB from FISHERLORA_FILET_CACHE_MB (default 256; 0: off).
DECOMPOSITIONS = DecompositionCache(int(os.environ.get("FISHERLORA_FILET_CACHE_MB", "256")) << 20)
