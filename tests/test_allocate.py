"""Property tests for the integer rank allocator (no torch needed)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherlora import allocate
from fisherlora.allocate import _targets, water_fill
from fisherlora.errors import ConfigError

NAMES = [f"layer{i}.{p}" for i in range(6) for p in ("q", "v")]
SCORE = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0]),  # zeros and ties
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
)
FAST = settings(max_examples=200, deadline=None)


@st.composite
def ranks_case(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=8, unique=True))
    scores = {m: draw(SCORE) for m in names}
    if draw(st.booleans()):
        scores = dict.fromkeys(names, 0.0)
    r_min = draw(st.integers(1, 4))
    r_max = draw(st.integers(r_min, 16))
    budget = draw(st.integers(len(names) * r_min, len(names) * r_max))
    return scores, budget, r_min, r_max


@st.composite
def params_case(draw):
    scores, _, r_min, r_max = draw(ranks_case())
    costs = {m: draw(st.integers(1, 50)) for m in scores}
    least = r_min * sum(costs.values())
    budget = draw(st.integers(least, least + (r_max + 2) * sum(costs.values())))
    return scores, budget, r_min, r_max, costs


@FAST
@given(ranks_case(), st.randoms(use_true_random=False))
def test_ranks_mode_properties(case, rng):
    scores, budget, r_min, r_max = case
    ranks = water_fill(scores, budget, r_min, r_max)
    assert set(ranks) == set(scores)
    assert sum(ranks.values()) == budget
    assert all(r_min <= r <= r_max for r in ranks.values())
    assert water_fill(scores, budget, r_min, r_max) == ranks
    items = list(scores.items())
    rng.shuffle(items)
    assert water_fill(dict(items), budget, r_min, r_max) == ranks
    for a in scores:
        for b in scores:
            # Holds exactly: water-filled targets are monotone in the score (computed in rational
            # arithmetic), and largest remainder only breaks ties between equal targets, which
            # for different scores are both clamped to an integer bound and so get no extra unit.
            if scores[a] > scores[b]:
                assert ranks[a] >= ranks[b]
            if scores[a] == scores[b]:
                assert abs(ranks[a] - ranks[b]) <= 1


@FAST
@given(params_case())
def test_parameter_mode_properties(case):
    scores, budget, r_min, r_max, costs = case
    ranks = water_fill(scores, budget, r_min, r_max, costs)
    assert set(ranks) == set(scores)
    spent = sum(ranks[m] * costs[m] for m in ranks)
    assert spent <= budget
    assert all(r_min <= r <= r_max for r in ranks.values())
    for m in ranks:  # maximal: nobody below r_max fits one more rank
        assert ranks[m] == r_max or spent + costs[m] > budget
    assert water_fill(dict(reversed(scores.items())), budget, r_min, r_max, costs) == ranks


@FAST
@given(ranks_case())
def test_unit_costs_match_ranks_mode(case):
    scores, budget, r_min, r_max = case
    ones = dict.fromkeys(scores, 1)
    assert water_fill(scores, budget, r_min, r_max, ones) == water_fill(
        scores, budget, r_min, r_max
    )


@FAST
@given(st.integers(1, 12), st.integers(1, 3), st.integers(0, 40))
def test_equal_scores_differ_by_at_most_one(n, r_min, extra):
    names = NAMES[:n]
    r_max = r_min + 5
    budget = min(n * r_min + extra, n * r_max)
    ranks = water_fill(dict.fromkeys(names, 0.5), budget, r_min, r_max)
    assert max(ranks.values()) - min(ranks.values()) <= 1
    assert sum(ranks.values()) == budget


def test_hand_checked_examples():
    assert water_fill({"a": 3, "b": 1}, 8, 1, 16) == {"a": 6, "b": 2}
    # a's target 11.96 is capped at 8; the other 4 ranks split 4/3 each, the spare unit to "b".
    scores = {"d": 1.0, "c": 1.0, "b": 1.0, "a": 1000.0}
    assert water_fill(scores, 12, 1, 8) == {"a": 8, "b": 2, "c": 1, "d": 1}
    # b (score 0) is lifted to r_min and a gets the rest.
    assert water_fill({"a": 10, "b": 0}, 6, 2, 16) == {"a": 4, "b": 2}
    # All zero scores count as equal.
    assert water_fill({"a": 0, "b": 0, "c": 0}, 7, 1, 4) == {"a": 3, "b": 2, "c": 2}
    # Parameters: targets proportional to the scores, 2.5 ranks each (2.5 · (10 + 30) = 100);
    # floors cost 80, b's extra rank (30) does not fit, a takes two more (10 each).
    assert water_fill({"a": 1, "b": 1}, 100, 1, 10, {"a": 10, "b": 30}) == {"a": 4, "b": 2}
    # a scores 3x b: targets 3λ and λ with 3λ·10 + λ·30 = 120, λ = 2
    assert water_fill({"a": 3, "b": 1}, 120, 1, 10, {"a": 10, "b": 30}) == {"a": 6, "b": 2}


def test_equal_scores_give_loras_plan_whatever_the_budget_counts():
    # MiniLM's 37 targets: 25 of 384 -> 384 (a rank costs 768) and 12 of 384 <-> 1536 (1920)
    costs = {f"n{i:02d}": 768 for i in range(25)} | {f"w{i:02d}": 1920 for i in range(12)}
    for r in (2, 8):
        lora = r * sum(costs.values())
        scores = dict.fromkeys(costs, 0.5)
        assert set(water_fill(scores, lora, max(1, r // 2), 2 * r, costs).values()) == {r}
        assert set(water_fill(scores, r * len(costs), max(1, r // 2), 2 * r).values()) == {r}


def test_parameter_budget_beyond_all_r_max_saturates():
    assert water_fill({"a": 1, "b": 0}, 10**6, 1, 8, {"a": 3, "b": 5}) == {"a": 8, "b": 8}


@pytest.mark.parametrize(
    ("budget", "r_min", "r_max", "numbers"),
    [(3, 2, 8, ["3", "2", "8", "4..16"]), (17, 1, 8, ["17", "1", "8", "2..16"])],
)
def test_infeasible_rank_budget_names_numbers(budget, r_min, r_max, numbers):
    with pytest.raises(ConfigError) as err:
        water_fill({"a": 1, "b": 2}, budget, r_min, r_max)
    for text in [*numbers, "2 modules"]:
        assert text in str(err.value)


def test_infeasible_parameter_budget_names_numbers():
    with pytest.raises(ConfigError, match=r"budget 50 .*below 60.*2 modules.*r_min=2"):
        water_fill({"a": 1, "b": 2}, 50, 2, 8, {"a": 10, "b": 20})


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
def test_bad_scores_name_the_module(bad):
    with pytest.raises(ConfigError, match="layer1"):
        water_fill({"layer0": 1.0, "layer1": bad}, 4, 1, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (({}, 4, 1, 4), "no modules"),
        (({"a": 1}, 4, 0, 4), "r_min"),
        (({"a": 1}, 4, 5, 4), "r_max"),
        (({"a": 1}, 4.0, 1, 4), "budget"),
        (({"a": 1, "b": 1}, 40, 1, 4, {"a": 3}), r"missing costs \['b'\]"),
        (({"a": 1}, 40, 1, 4, {"a": 3, "z": 1}), r"without scores \['z'\]"),
        (({"a": 1}, 40, 1, 4, {"a": 0}), "cost of module 'a'"),
        (({"a": 1}, 40, 1, 4, {"a": 2.5}), "positive int"),
    ],
)
def test_bad_inputs_raise_config_error(args, match):
    with pytest.raises(ConfigError, match=match):
        water_fill(*args)


def test_largest_rounding_spends_more_where_the_hand_out_stops_short():
    # targets ≈ 1.88, 1.48, 1.38 (costs 5, 3, 3; budget 18): floors spend 11, 7 are left.
    # The hand-out gives A its unit (largest remainder) and then nothing fits: 16 of 18.
    # B and C together spend 6: 17, the largest total not above 18.
    scores, costs = {"a": 1.9, "b": 1.5, "c": 1.4}, {"a": 5, "b": 3, "c": 3}
    assert water_fill(scores, 18, 1, 4, costs, rounding="maximal") == {"a": 2, "b": 1, "c": 1}
    assert water_fill(scores, 18, 1, 4, costs, rounding="largest") == {"a": 1, "b": 2, "c": 2}
    # the default is DESIGN.md's rounding, the largest total
    assert water_fill(scores, 18, 1, 4, costs) == {"a": 1, "b": 2, "c": 2}


def brute_force_largest_total(scores, budget, r_min, r_max, costs):
    """The largest Σ c_m r_m ≤ budget over every plan with floor(t_m) ≤ r_m ≤ r_max."""
    unit = dict(costs)
    targets = _targets({m: Fraction(s) for m, s in scores.items()}, unit, budget, r_min, r_max)
    floors = {m: math.floor(t) for m, t in targets.items()}
    names = sorted(floors)
    best = -1
    for plan in itertools.product(*(range(floors[m], r_max + 1) for m in names)):
        total = sum(unit[m] * r for m, r in zip(names, plan, strict=True))
        if total <= budget:
            best = max(best, total)
    return best


@st.composite
def small_params_case(draw):
    names = NAMES[: draw(st.integers(1, 5))]
    scores = {m: draw(SCORE) for m in names}
    r_min = draw(st.integers(1, 2))
    r_max = draw(st.integers(r_min, r_min + 3))
    costs = {m: draw(st.sampled_from([2, 3, 5, 7, 12, 30])) for m in names}
    least = r_min * sum(costs.values())
    budget = draw(st.integers(least, r_max * sum(costs.values())))
    return scores, budget, r_min, r_max, costs


@FAST
@given(small_params_case())
def test_largest_rounding_reaches_the_brute_force_optimum(case):
    scores, budget, r_min, r_max, costs = case
    largest = water_fill(scores, budget, r_min, r_max, costs, rounding="largest")
    maximal = water_fill(scores, budget, r_min, r_max, costs, rounding="maximal")

    def spent(ranks):
        return sum(ranks[m] * costs[m] for m in ranks)

    optimum = brute_force_largest_total(scores, budget, r_min, r_max, costs)
    assert spent(largest) == optimum <= budget
    assert all(r_min <= r <= r_max for r in largest.values())
    for m in largest:  # maximal too: nobody below r_max fits one more rank
        assert largest[m] == r_max or spent(largest) + costs[m] > budget
    if spent(maximal) == optimum:  # the hand-out was already the largest: the same plan
        assert largest == maximal
    shuffled = dict(reversed(scores.items()))
    assert water_fill(shuffled, budget, r_min, r_max, costs, rounding="largest") == largest


@FAST
@given(ranks_case())
def test_largest_rounding_is_the_plain_one_when_ranks_are_counted(case):
    scores, budget, r_min, r_max = case
    assert water_fill(scores, budget, r_min, r_max, rounding="largest") == water_fill(
        scores, budget, r_min, r_max, rounding="maximal"
    )


def test_an_unknown_rounding_is_refused():
    with pytest.raises(ConfigError, match="rounding must be one of maximal, largest, got 'big'"):
        water_fill({"a": 1.0}, 2, 1, 4, rounding="big")


def test_largest_rounding_too_slow_to_solve_warns_and_hands_out_as_maximal(monkeypatch):
    monkeypatch.setattr(allocate, "LARGEST_ROUNDING_WORK", 0)
    scores, costs = {"a": 1.9, "b": 1.5, "c": 1.4}, {"a": 5, "b": 3, "c": 3}
    with pytest.warns(UserWarning, match="rounding='largest' skipped: 2 distinct rank costs"):
        ranks = water_fill(scores, 18, 1, 4, costs, rounding="largest")
    assert ranks == water_fill(scores, 18, 1, 4, costs, rounding="maximal")
