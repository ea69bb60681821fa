"""Every input the fuzz harnesses found failing (tests/fuzz/regressions/<harness>/)
is now loaded or refused with a MemboostError naming what is wrong."""

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "fuzz"))
import driver  # noqa: E402

REGRESSIONS = os.path.join(HERE, "fuzz", "regressions")
CASES = sorted((harness, name) for harness in os.listdir(REGRESSIONS)
               for name in os.listdir(os.path.join(REGRESSIONS, harness)))


def test_every_regression_names_a_harness():
    assert CASES and {h for h, _ in CASES} <= set(driver.harness_names())


@pytest.mark.parametrize("harness,name", CASES, ids=[f"{h}/{n}" for h, n in CASES])
def test_fuzz_regression(harness, name):
    with open(os.path.join(REGRESSIONS, harness, name), "rb") as f:
        data = f.read()
    assert driver.classify(driver.load_harness(harness).target, data) in ("loaded", "refused")
