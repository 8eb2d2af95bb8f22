"""The benchmark's order-balanced ratio: a slowdown by position cancels, one disturbed round does not decide."""

from __future__ import annotations

import pytest

from bench.figures import balanced_rounds, order_balanced_ratio, rotated


def simulated_rounds(arms: tuple[str, ...], count: int, true_ratio: float, position_slowdown: float) -> list:
    """Rounds where ``ours`` costs ``true_ratio`` times ``base`` and each later position is slower by a factor."""
    rounds = []
    for run in range(1, count + 1):
        order = rotated(arms, run)
        sample = {name: 100.0 * (true_ratio if name == "ours" else 1.0) * position_slowdown ** order.index(name)
                  for name in order}
        rounds.append((order, sample))
    return rounds


@pytest.mark.parametrize("arms", [("base", "ours"), ("base", "ours", "other")])
def test_a_slowdown_by_position_cancels_out(arms):
    rounds = simulated_rounds(arms, balanced_rounds(5, len(arms)), true_ratio=1.01, position_slowdown=1.07)
    naive = rounds[0][1]["ours"] / rounds[0][1]["base"]
    assert abs(naive - 1.01) > 0.05  # a single round is biased by the order
    assert order_balanced_ratio(rounds, "ours", "base", len(arms)) == pytest.approx(1.01, abs=1e-4)


def test_one_disturbed_round_moves_one_cycle_only():
    rounds = simulated_rounds(("base", "ours"), balanced_rounds(5, 2), true_ratio=1.0, position_slowdown=1.06)
    rounds[1][1]["ours"] *= 1.15  # e.g. a clock drop during one job
    assert order_balanced_ratio(rounds, "ours", "base", 2) == pytest.approx(1.0, abs=1e-4)


def test_every_figure_gets_at_least_three_whole_cycles():
    assert balanced_rounds(5, 2) == 6
    assert balanced_rounds(5, 3) == 9
    assert balanced_rounds(10, 3) == 12
