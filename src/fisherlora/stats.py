"""Reducers over captured statistics, and the one place that all-reduces across processes.

Under ``torch.distributed`` every statistic is summed (with its count) over all processes, so each
process ends with the numbers one process would compute on the union of the data. Gradients are
those of the global batch loss, the mean of the processes' equally sized local losses (as DDP
averages them): a local gradient is ``world_size`` times its share of the global one. Where the
processes' losses average different numbers of scored tokens (a causal LM's batches), that mean
of means is what DDP trains on but not the loss of the union, so the statistics built on the
batch gradient (FIM-LoRA's batch estimator, FILet's q, FW-LoRA's proxy) follow DDP's weighting;
the per-example estimator weighs each example as one process would. Without an initialised
process group every function here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (in place; returned for chaining)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def min_and_max(value: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """The smallest and largest ``value`` over all processes (``(value, value)`` for one): e.g.
    to refuse, on every process alike, a count that per-batch collectives need equal."""
    if not is_distributed():
        return value, value
    both = torch.tensor([-value, value], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -int(both[0]), int(both[1])


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (in place): the gradient of the global batch loss
    when every process holds the gradient of its own equally sized share of the batch."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def per_example_sq_grad(
    u: torch.Tensor, g: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ_i (c_i G_i)²`` elementwise, with ``G_i = Σ_t g_{i,t} u_{i,t}ᵀ`` example i's share of the
    weight gradient for a linear map ``u → y`` (``g = ∂L/∂y``) and ``c_i`` = ``scale[i]`` (1 if
    not given; see ``capture.example_loss_scale``); shape ``[out, in]``.

    ``u``: ``[batch, seq, in]`` or ``[batch, in]``; ``g`` the matching ``[..., out]``. Padded
    tokens must already be zero in ``u`` or ``g``. Memory: ``batch · out · in`` floats.
    """
    spec = "bo,bi->boi" if u.dim() == 2 else "bto,bti->boi"
    squared = torch.einsum(spec, g, u).square()
    if scale is None:
        return squared.sum(dim=0)
    return torch.einsum("boi,b->oi", squared, scale.to(squared.dtype).square())


def reduce_score(fisher: torch.Tensor, how: str) -> float:
    """One importance number from a module's Fisher diagonal: ``mean`` (default, comparable
    across layer sizes), ``max``, or ``l2`` (Frobenius norm ``‖F‖₂``, grows with the size)."""
    if how == "mean":
        return fisher.mean().item()
    if how == "max":
        return fisher.max().item()
    if how == "l2":
        return torch.linalg.vector_norm(fisher).item()
    raise ValueError(f"unknown score {how!r}; use 'mean', 'max' or 'l2'")


class ProjectedSquares:
    """``Σ_t (d_iᵀ z_t)²`` for the columns ``d_i`` of ``directions`` [dim, k], projecting every
    ``z_t`` (T·dim·k work); with ``lift`` [ℓ, dim], for ``d_i = Lᵀ p_i`` and ``p_i`` the columns
    of ``directions`` [ℓ, k] (T·ℓ·(dim + k) work)."""

    def __init__(self, directions: torch.Tensor, lift: torch.Tensor | None = None) -> None:
        self.directions, self.lift = directions, lift
        self.sums = torch.zeros(directions.shape[1], device=directions.device)

    def add(self, z: torch.Tensor, lifted: bool = False) -> None:
        """``z`` [T, dim], or with ``lifted`` already ``L z`` [T, ℓ]."""
        y = z if self.lift is None or lifted else z @ self.lift.T
        self.sums += (y @ self.directions).square().sum(dim=0)

    def result(self) -> torch.Tensor:
        return self.sums


class SecondMoment:
    """The same sums for directions ``d_i = Lᵀ p_i`` from ``S = Σ_t (L z_t)(L z_t)ᵀ``:
    ``Σ_t (d_iᵀ z_t)² = p_iᵀ S p_i`` (T·ℓ² work, plus T·ℓ·dim to apply ``L`` [ℓ, dim]; ``L = I``
    when None). ``S`` is summed in float64: a quadratic form of a float32 ``S`` loses the small
    ``p_iᵀ S p_i`` (relative errors up to 3e-4 on MiniLM, against 8e-6 of the projections; float64
    matches them) and FILet's ``select="min"`` reads exactly those."""

    def __init__(self, p: torch.Tensor, lift: torch.Tensor | None = None) -> None:
        self.p, self.lift = p, lift
        self.s = torch.zeros(p.shape[0], p.shape[0], device=p.device, dtype=torch.float64)

    def add(self, z: torch.Tensor, lifted: bool = False) -> None:
        """``z`` [T, dim], or with ``lifted`` already ``L z`` [T, ℓ]."""
        y = (z if self.lift is None or lifted else z @ self.lift.T).double()
        self.s.addmm_(y.T, y)

    def result(self) -> torch.Tensor:
        p = self.p.double()
        return ((self.s @ p) * p).sum(dim=0).float()
