"""Short passes of every loader fuzz harness (tests/fuzz/, atheris): a CI pass of a few
hundred inputs each in the default suite, a few thousand each in make test-slow; every one loaded or refused with a MemboostError
(tests/fuzz/driver.py says what else counts as a failure). `make fuzz` runs
the long pass."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fuzz"))
import driver  # noqa: E402

# Inputs per harness in make test-slow; the folder loaders (a model or an
# adapter rebuilt per input, ~30 ms each) get fewer.
MODEL_FOLDERS = ("checkpoint", "from_pretrained")
RUNS = {name: 1000 for name in MODEL_FOLDERS}
DEFAULT_RUNS = 2000
CI_RUNS = 1000


def _short_pass(name, runs, tmp_path):
    stats = driver.run([name], runs=runs, max_seconds=0, artifacts=str(tmp_path), quiet=True)[name]
    assert stats["returncode"] == 0, f"fuzz harness {name!r} failed:\n{stats.get('log', '')}"
    # libFuzzer runs each requested input once, and now and then one more
    # (it may run an input again, e.g. to confirm new coverage), never fewer.
    total = sum(stats[k] for k in driver.OUTCOMES)
    assert runs <= total <= runs + max(2, runs // 100), stats
    assert stats["refused"] > 0 and stats["loaded"] > 0, stats  # the harness reaches both ends


@pytest.mark.parametrize("name", driver.harness_names())
def test_fuzz_ci_pass(name, tmp_path):
    # Each harness is a libFuzzer process that imports torch (~10 s): a
    # thousand inputs each (300 for the model folders) keeps the pass near two minutes.
    _short_pass(name, 300 if name in MODEL_FOLDERS else CI_RUNS, tmp_path)


# Slow: the harnesses' processes took 10 min on this shared 2-core machine.
@pytest.mark.slow
@pytest.mark.parametrize("name", driver.harness_names())
def test_fuzz_short_pass(name, tmp_path):
    _short_pass(name, RUNS.get(name, DEFAULT_RUNS), tmp_path)


def _zeros(t):
    return int((t == 0).sum())


def test_the_drivers_comparison_tracer_keeps_no_tensor():
    """atheris' native tracer of instrumented comparisons keeps every non-plain
    result (a tensor from `w == 0`): the from_pretrained harness grew by
    ~40 KB per input until libFuzzer's RSS limit stopped it. The driver's
    wrapper traces only plain values and compares the rest itself."""
    import gc

    import atheris
    import torch

    def live_tensors():
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    native = atheris._trace_cmp
    counted = atheris.instrument_func(_zeros)
    t = torch.zeros(8, 8)
    try:
        driver._trace_plain_comparisons_only(atheris)
        before = live_tensors()
        assert all(counted(t) == 64 for _ in range(200))
        assert live_tensors() - before < 5
    finally:
        atheris._trace_cmp = native
