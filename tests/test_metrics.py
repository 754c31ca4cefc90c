"""Per-task summaries (metalearn/metrics.py) on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metalearn.metrics import summarize


def test_ci95_is_1_96_std_over_sqrt_n_on_known_values():
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0]), "mse")
    # population std of 1..4 = sqrt(1.25); n = 4
    assert s["mean"] == 2.5 and s["n_tasks"] == 4
    assert s["ci95"] == pytest.approx(1.96 * math.sqrt(1.25) / 2, rel=1e-12)
    s = summarize(np.array([0.0, 1.0] * 50), "accuracy")  # std 0.5, n 100
    assert s["ci95"] == pytest.approx(1.96 * 0.5 / 10, rel=1e-12)
    assert summarize(np.full(7, 0.3), "accuracy")["ci95"] == 0.0
