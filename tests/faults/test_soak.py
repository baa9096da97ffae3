"""A short soak (20 s): reloads and backend churn under load, then no leaks."""

from __future__ import annotations

import pytest

from .soak import soak


@pytest.mark.timeout(120)
def test_short_soak_leaves_nothing_behind() -> None:
    report = soak(20.0)
    assert report.reloads >= 5 and report.churned >= 2, report
    assert report.result.completed > 1000, report.result
    assert not report.problems, report.problems
