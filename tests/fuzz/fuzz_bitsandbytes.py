"""memboost.formats.nf4.from_bitsandbytes on edited bitsandbytes Linear4bit states
(what to_bitsandbytes writes, with and without double quantization)."""

from memboost import nf4

import mutate
import seeds as _seeds


def _states():
    return [nf4.to_bitsandbytes(q, prefix="weight") for q in _seeds.quantized("nf4")]


def seeds():
    return [b"\x00", b"\x01", b"\x02", bytes(16)]


def target(data: bytes) -> None:
    state = mutate.mutate_state(data, _states(), json_keys=("quant_state",))
    _seeds.exercise(nf4.from_bitsandbytes(state, prefix="weight"))
