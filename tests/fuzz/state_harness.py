"""The from_state_dict harnesses (fuzz_state_<format>.py) are this with a format name."""

from memboost.formats.tensor import QuantizedTensor

import mutate
import seeds


def make(fmt: str):
    def harness_seeds():
        return [b"\x00", b"\x01", b"\x02", bytes(16)]  # no edits: each valid state as memboost wrote it

    def target(data: bytes) -> None:
        state = mutate.mutate_state(data, seeds.states(fmt))
        seeds.exercise(QuantizedTensor.from_state_dict(state, name="layer"))

    return harness_seeds, target
