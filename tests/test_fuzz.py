"""The short pass (make test-slow) of every loader fuzz harness (tests/fuzz/, atheris): a few
thousand inputs each, every one loaded or refused with a MemboostError
(tests/fuzz/driver.py says what else counts as a failure). `make fuzz` runs
the long pass."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fuzz"))
import driver  # noqa: E402

# Inputs per harness; the folder loaders (a model or an adapter rebuilt per
# input, ~30 ms each) get fewer to keep the whole pass near two minutes.
RUNS = {"checkpoint": 1000}
DEFAULT_RUNS = 2000


# Slow: eight libFuzzer processes (each imports torch and instruments
# memboost, ~10 s) took 10 min on this shared 2-core machine; make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("name", driver.harness_names())
def test_fuzz_short_pass(name, tmp_path):
    runs = RUNS.get(name, DEFAULT_RUNS)
    stats = driver.run([name], runs=runs, max_seconds=0, artifacts=str(tmp_path), quiet=True)[name]
    assert stats["returncode"] == 0, f"fuzz harness {name!r} failed:\n{stats.get('log', '')}"
    assert sum(stats[k] for k in driver.OUTCOMES) == runs
    assert stats["refused"] > 0 and stats["loaded"] > 0, stats  # the harness reaches both ends
