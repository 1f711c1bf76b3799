"""Tests for distsparse.sparsity.schedules: cubic sparsity, cosine decay, update steps (hand values)."""
from __future__ import annotations

import pytest

from distsparse.sparsity.allocation import active_count
from distsparse.sparsity.schedules import cosine_decay, cubic_sparsity, is_update_step


def test_cubic_endpoints():
    assert cubic_sparsity(0.0, 0.0, 0.9) == 0.0
    assert cubic_sparsity(0.0, 0.5, 0.9) == 0.5
    assert cubic_sparsity(1.0, 0.0, 0.9) == 0.9
    assert cubic_sparsity(1.0, 0.5, 0.98) == 0.98
    # Clamped outside [0, 1].
    assert cubic_sparsity(1.7, 0.2, 0.9) == 0.9
    # s_f + (s_i - s_f) is 0.9 + (0.2 - 0.9) = 0.20000000000000007 in floats: one ulp off s_i.
    # What matters downstream is the count, which active_count's floor guard makes exact.
    assert cubic_sparsity(-0.3, 0.2, 0.9) == pytest.approx(0.2, rel=0, abs=1e-15)


@pytest.mark.parametrize("numel", [10, 100, 1000, 2008, 12345, 25_557_032])
def test_cubic_start_gives_the_exact_initial_count(numel):
    for initial in (0.1, 0.2, 0.3, 0.5, 0.7):
        s = cubic_sparsity(0.0, initial, 0.9)
        expected_zeros = (round(initial * 10) * numel) // 10  # floor(initial * numel), exactly
        assert active_count(numel, 1.0 - s) == numel - expected_zeros


def test_cubic_hand_values():
    # s_t = s_f + (s_i - s_f)(1 - t)^3
    assert cubic_sparsity(0.5, 0.0, 0.9) == pytest.approx(0.9 - 0.9 / 8, abs=1e-15)  # 0.7875
    assert cubic_sparsity(0.5, 0.5, 0.9) == pytest.approx(0.9 - 0.4 / 8, abs=1e-15)  # 0.85
    assert cubic_sparsity(1 / 3, 0.0, 0.9) == pytest.approx(0.9 - 0.9 * 8 / 27, abs=1e-15)
    assert cubic_sparsity(0.25, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 27 / 64, abs=1e-15)


def test_cubic_is_non_decreasing():
    values = [cubic_sparsity(i / 100, 0.1, 0.95) for i in range(101)]
    assert values == sorted(values)


def test_cosine_endpoints_and_midpoint():
    assert cosine_decay(0, 100, 0.3) == pytest.approx(0.3, abs=1e-15)
    assert cosine_decay(100, 100, 0.3) == pytest.approx(0.0, abs=1e-15)
    assert cosine_decay(250, 100, 0.3) == pytest.approx(0.0, abs=1e-15)
    assert cosine_decay(50, 100, 0.3) == pytest.approx(0.15, abs=1e-15)
    assert cosine_decay(0, 1000, 0.5, 0.005) == pytest.approx(0.5, abs=1e-15)
    assert cosine_decay(1000, 1000, 0.5, 0.005) == pytest.approx(0.005, abs=1e-15)
    assert cosine_decay(500, 1000, 0.5, 0.005) == pytest.approx((0.5 + 0.005) / 2, abs=1e-15)


def test_cosine_hand_value_quarter():
    # (1 + cos(pi/4)) / 2 = (2 + sqrt 2) / 4
    assert cosine_decay(25, 100, 1.0) == pytest.approx((2 + 2**0.5) / 4, abs=1e-15)


def test_cosine_zero_total_steps_is_the_minimum():
    assert cosine_decay(0, 0, 0.3, 0.01) == 0.01


def test_is_update_step_exact_list():
    assert [s for s in range(13) if is_update_step(s, 3, 2, 10)] == [3, 6, 9]
    # Step 0 is never an update step, even when begin is 0.
    assert [s for s in range(0, 1001) if is_update_step(s, 100, 0, 750)] == [
        100, 200, 300, 400, 500, 600, 700
    ]
    # Both ends are inclusive.
    assert [s for s in range(0, 20) if is_update_step(s, 5, 5, 15)] == [5, 10, 15]
    assert [s for s in range(0, 20) if is_update_step(s, 5, 6, 14)] == [10]
