"""memboost.load_safetensors on mutated files that save_safetensors wrote
(every format's states under layer prefixes, tied tensors, an empty one);
what loads is then rebuilt with QuantizedTensor.from_state_dict per layer.
Loaded with the checksums checked (load or a named refusal), then without:
a hostile file can carry checksums that match, so the checks after them must
hold on their own, and the mutated bytes should reach them."""

import os

import memboost
from memboost.formats.tensor import FORMAT_INFO_KEY, QuantizedTensor

import seeds as _seeds

PATH = os.path.join(_seeds.FOLDER, "input.safetensors")


def seeds():
    return list(_seeds.safetensors_files())


def target(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        memboost.load_safetensors(PATH)
    except memboost.MemboostError:
        pass
    state = memboost.load_safetensors(PATH, verify=False)
    for key in state:
        if key.endswith("." + FORMAT_INFO_KEY):
            prefix = key[:-len(FORMAT_INFO_KEY)]
            layer = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            _seeds.exercise(QuantizedTensor.from_state_dict(layer, name=prefix[:-1]))
