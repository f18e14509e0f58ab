"""Reducers over captured statistics, and the one place that all-reduces across processes.

Under ``torch.distributed`` every statistic is summed (with its count) over all processes, so each
process ends with the numbers one process would compute on the union of the data. Gradients are
those of the global batch loss, the mean of the processes' equally sized local losses (as DDP
averages them): a local gradient is ``world_size`` times its share of the global one. Without an
initialised process group every function here is the identity.
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
