"""QuantizedTensor.from_state_dict on edited ternary states (tests/fuzz/mutate.py), then dequantize and linear."""

import state_harness

seeds, target = state_harness.make("ternary")
