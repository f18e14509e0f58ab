"""Integer LoRA rank allocation by water filling (FIM-LoRA); pure Python, no torch.

Given importance scores ``s_m >= 0`` and a budget ``B``, the continuous targets are

    t_m = clip(lam * s_m, r_min, r_max)    with ``lam`` chosen so that  sum_m c_m t_m = B,

where ``c_m`` is the cost of one rank unit (``c_m = 1`` when the budget counts ranks, ``n_m + m_m``
for an ``n_m -> m_m`` linear layer when it counts parameters). The targets are proportional to
the scores whatever the budget counts; the costs only set the level ``lam``: without caps
``t_m = B * s_m / sum_m' (s_m' c_m')``, so equal scores give every module the same rank (LoRA's
plan, in either budget). ``lam`` is found exactly (in rational arithmetic) by classic
water filling: modules whose target leaves ``[r_min, r_max]`` are clamped to that bound and what is
left of the budget is shared again in proportion to the scores of the others, until no target
moves. Scores that are all zero among the modules still free count as equal. Targets are then
floored and the units left over handed out one rank at a time in order of largest fractional part
(ties by module name, ascending), round-robin, never above ``r_max`` or the budget.

With a parameter budget that hand-out can stop short of the largest total: a module that no
longer fits is skipped, and another choice of modules to round up might spend more.
``rounding="largest"`` hands out the units that reach the largest total not above the budget
(a bounded subset sum over the modules' costs, exact, solved on bit masks of the reachable
totals), choosing among the largest totals the one the round-robin order prefers: where the
plain hand-out already reaches the largest total, the two give the same ranks.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction

from fisherlora.errors import ConfigError

ROUNDINGS = ("maximal", "largest")
# DESIGN.md asks for the largest total not above a parameter budget; "maximal" (the round-robin
# hand-out alone) was the only rounding before 2026-12-03 and stays for runs made with it
DEFAULT_ROUNDING = "largest"
# bound on the 64-bit word operations of rounding="largest" (about a second of big-int shifts)
LARGEST_ROUNDING_WORK = 200_000_000


def water_fill(
    scores: Mapping[str, float],
    budget: int,
    r_min: int,
    r_max: int,
    costs: Mapping[str, int] | None = None,
    rounding: str = DEFAULT_ROUNDING,
) -> dict[str, int]:
    """Integer ranks ``r_min <= r_m <= r_max`` in proportion to ``scores`` (see module docstring).

    Ranks mode (``costs is None``): ``sum(r_m) == budget`` exactly; a module with a strictly larger
    score never gets a smaller rank, and equal scores get ranks that differ by at most 1.
    Parameter mode (``costs`` = parameters per rank unit): ``sum(r_m * c_m) <= budget`` and the
    allocation is maximal: no module below ``r_max`` can gain one rank without exceeding the budget.
    With ``rounding="largest"`` (the default) the total is moreover the largest of every plan with
    ``floor(t_m) <= r_m <= r_max``; ``"maximal"`` is the round-robin hand-out alone (in ranks
    mode the two roundings agree).
    The result depends only on the contents of the mappings, not on their order.
    Raises ``ConfigError`` for bad scores, costs, bounds, rounding or an infeasible budget.
    """
    names = sorted(scores)
    if not names:
        raise ConfigError("cannot allocate ranks: no modules were scored")
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    for m in names:
        s = scores[m]
        if not math.isfinite(s) or s < 0:
            raise ConfigError(f"score of module {m!r} must be finite and >= 0, got {s!r}")
    for label, v in (("budget", budget), ("r_min", r_min), ("r_max", r_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{label} must be an int, got {v!r}")
    if r_min < 1 or r_max < r_min:
        raise ConfigError(f"rank bounds must satisfy 1 <= r_min <= r_max, got {r_min=} {r_max=}")
    n = len(names)
    if costs is None:
        unit = dict.fromkeys(names, 1)
        if not n * r_min <= budget <= n * r_max:
            raise ConfigError(
                f"rank budget {budget} is infeasible for {n} modules with r_min={r_min}, "
                f"r_max={r_max}: achievable totals are {n * r_min}..{n * r_max}"
            )
    else:
        unit = _check_costs(names, costs)
        least = r_min * sum(unit.values())
        if least > budget:
            raise ConfigError(
                f"parameter budget {budget} is below {least}, the cost of giving all {n} modules "
                f"r_min={r_min} (one rank costs {sum(unit.values())} over all modules)"
            )
    exact = {m: Fraction(scores[m]) for m in names}
    targets = _targets(exact, unit, budget, r_min, r_max)
    return _round(targets, unit, budget, r_max, largest=rounding == "largest")


def _check_costs(names: list[str], costs: Mapping[str, int]) -> dict[str, int]:
    missing, extra = set(names) - set(costs), set(costs) - set(names)
    if missing or extra:
        raise ConfigError(
            f"scores and costs must name the same modules: missing costs {sorted(missing)}, "
            f"costs without scores {sorted(extra)}"
        )
    for m in names:
        c = costs[m]
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise ConfigError(f"cost of module {m!r} must be a positive int, got {c!r}")
    return {m: costs[m] for m in names}


def _targets(
    scores: dict[str, Fraction], costs: dict[str, int], budget: int, lo: int, hi: int
) -> dict[str, Fraction]:
    """Exact water filling; clamps only modules that are also out of bounds at the final level.

    If the over-cap modules would give back more than the under-floor ones need, the final level is
    higher, so the over-cap ones stay capped: clamp them. Otherwise clamp the under-floor ones.
    """
    fixed: dict[str, Fraction] = {}
    while True:
        free = [m for m in scores if m not in fixed]
        if not free:
            return fixed
        rest = budget - sum(costs[m] * fixed[m] for m in fixed)
        weight = {m: scores[m] for m in free}
        if not any(weight.values()):
            weight = dict.fromkeys(free, Fraction(1))
        # t_m = lam * s_m with the level lam that spends what is left on the free modules
        level = rest / sum(weight[m] * costs[m] for m in free)
        t = {m: level * weight[m] for m in free}
        over = [m for m in free if t[m] > hi]
        under = [m for m in free if t[m] < lo]
        if not over and not under:
            return {**fixed, **t}
        excess = sum(costs[m] * (t[m] - hi) for m in over)
        excess -= sum(costs[m] * (lo - t[m]) for m in under)
        for m in over if excess >= 0 else ():
            fixed[m] = Fraction(hi)
        for m in under if excess <= 0 else ():
            fixed[m] = Fraction(lo)


def _round(
    targets: dict[str, Fraction], costs: dict[str, int], budget: int, hi: int, largest: bool
) -> dict[str, int]:
    """Floor the targets, then hand out the units left in round-robin order (largest fractional
    part first, ties by name): each unit to the next module that fits (``largest=False``), or to
    the next module that still lets the units given reach the largest total (``largest=True``)."""
    ranks = {m: math.floor(t) for m, t in targets.items()}
    left = budget - sum(costs[m] * r for m, r in ranks.items())
    order = sorted(ranks, key=lambda m: (ranks[m] - targets[m], m))
    # the units in the order they are offered: one per module a pass, passes until r_max
    slots = [m for extra in range(1, hi + 1) for m in order if ranks[m] + extra <= hi]
    if largest:
        slots = _slots_reaching_the_largest_total(slots, costs, left)
    for m in slots:
        if costs[m] <= left:
            ranks[m] += 1
            left -= costs[m]
    return ranks


def _slots_reaching_the_largest_total(
    slots: list[str], costs: dict[str, int], left: int
) -> list[str]:
    """The first subsequence of ``slots`` (in their order) whose costs sum to the largest total
    not above ``left``: a unit is kept where the units still to come can make up the rest.

    Units of equal cost are interchangeable, so the units still to come are counted per cost
    and what they can add up to is a bit mask (bit t set: a total of t reachable). Once a unit
    of some cost is passed over, every later unit of that cost would be too (it could only do
    what the passed one could), so that cost is closed."""
    if not slots or left <= 0:
        return []
    unit = math.gcd(*(costs[m] for m in slots))  # every total is a multiple of it
    cap = left // unit
    count = Counter(costs[m] // unit for m in slots)
    shifts = sum(min(k, cap // c).bit_length() for c, k in count.items())
    if len(slots) * shifts * (cap // 64 + 1) > LARGEST_ROUNDING_WORK:
        # many distinct costs with a small common divisor (real models have a few layer shapes)
        warnings.warn(
            f"rounding='largest' skipped: {len(count)} distinct rank costs with common divisor "
            f"{unit} make the exact subset sum too slow here; the units went out as with "
            "rounding='maximal'",
            stacklevel=4,
        )
        return slots
    need = _reachable(count, cap).bit_length() - 1  # the largest total (in units of `unit`)
    kept, closed = [], set()
    for m in slots:
        c = costs[m] // unit
        count[c] -= 1
        if need == 0:
            break
        if c in closed:
            continue
        rest = {k: n for k, n in count.items() if k not in closed}
        if c <= need and _reachable(rest, need - c) >> (need - c) & 1:
            kept.append(m)
            need -= c
        else:
            closed.add(c)
    return kept


def _reachable(count: Mapping[int, int], cap: int) -> int:
    """The totals up to ``cap`` that sums of at most ``count[c]`` units of each cost ``c`` reach,
    as a bit mask; k units of one cost go in as pieces 1, 2, 4, ... (any count up to k is a sum
    of some of them), so a cost with k units costs about log2(k) shifts."""
    mask, full = 1, (1 << (cap + 1)) - 1
    for c, k in count.items():
        k = min(k, cap // c)  # costs are positive: c >= 1
        piece = 1
        while k > 0:
            take = min(piece, k)
            mask |= (mask << (c * take)) & full
            k -= take
            piece *= 2
    return mask
