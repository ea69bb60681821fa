import pytest
import torch

import memboost
from memboost import ops, reference

BITS = {2: (ops.pack_2bit, ops.unpack_2bit, reference.pack_2bit, reference.unpack_2bit, 16),
        4: (ops.pack_4bit, ops.unpack_4bit, reference.pack_4bit, reference.unpack_4bit, 8)}


def _codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [(0,), (1,), (15,), (16,), (17,), (1000,), (3, 33), (2, 3, 64), (4, 0)])
def test_kernels_match_reference(device, bits, shape):
    pack, unpack, pack_ref, unpack_ref, per_word = BITS[bits]
    values = _codes(shape, bits).to(device)
    packed = pack(values)
    assert packed.dtype == torch.int32 and packed.device.type == device
    assert packed.shape == (*shape[:-1], -(-shape[-1] // per_word))
    torch.testing.assert_close(packed.cpu(), pack_ref(values.cpu()), rtol=0, atol=0)
    n = shape[-1]
    torch.testing.assert_close(unpack(packed, n).cpu(), values.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(unpack_ref(packed.cpu(), n), values.cpu(), rtol=0, atol=0)


def test_seed_layout_lsb_first(device):
    # The seed's example: [0,1,2,3]*4 -> one int32; element j at bits 2j..2j+1,
    # so every byte is 0b11_10_01_00 = 0xE4.
    values = torch.tensor([0, 1, 2, 3] * 4, dtype=torch.uint8, device=device)
    packed = memboost.pack_2bit(values)
    assert packed.shape == (1,)
    assert int(packed[0]) == int.from_bytes(b"\xe4" * 4, "little", signed=True)
    assert memboost.unpack_2bit(packed, num_elements=16).tolist() == values.tolist()


def test_4bit_layout_lsb_first(device):
    values = torch.arange(1, 9, dtype=torch.uint8, device=device)  # 1..8
    packed = memboost.pack_4bit(values)
    assert int(packed[0]) == int.from_bytes(bytes([0x21, 0x43, 0x65, 0x87]), "little", signed=True)


def test_tail_is_zero_padded_and_length_is_given_back(device):
    values = torch.full((17,), 3, dtype=torch.uint8, device=device)
    packed = memboost.pack_2bit(values)
    assert packed.shape == (2,)
    assert int(packed[1]) == 3  # only element 0 of the second word is set
    assert memboost.unpack_2bit(packed, 17).tolist() == [3] * 17


@pytest.mark.parametrize("bits", [2, 4])
def test_opcheck(device, bits):
    pack, unpack, *_ = BITS[bits]
    values = _codes((5, 40), bits).to(device)
    torch.library.opcheck(torch.ops.memboost.__getattr__(f"pack_{bits}bit").default, (values,))
    torch.library.opcheck(torch.ops.memboost.__getattr__(f"unpack_{bits}bit").default, (pack(values), 40))


def test_bad_input_is_named(device):
    with pytest.raises(ValueError, match=r"'values' must lie in \[0, 3\]"):
        memboost.pack_2bit(torch.tensor([0, 4], dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match=r"'values' must lie in \[0, 15\]"):
        memboost.pack_4bit(torch.tensor([16], dtype=torch.uint8, device=device))
    with pytest.raises(memboost.MemboostTypeError, match="'values' must be a torch.uint8 tensor"):
        memboost.pack_2bit(torch.tensor([1, 2], dtype=torch.int64, device=device))
    # the native checks raise ValueError too, with torch's dtype names
    with pytest.raises(ValueError, match="'values' must have dtype torch.uint8, got torch.float32"):
        ops.pack_2bit(torch.tensor([1.0], device=device))
    with pytest.raises(ValueError, match="'num_elements' must be in"):
        memboost.unpack_2bit(torch.zeros(1, dtype=torch.int32, device=device), 17)
    with pytest.raises(ValueError, match="'packed' must have dtype"):
        memboost.unpack_2bit(torch.zeros(1, dtype=torch.int64, device=device), 16)
    with pytest.raises(ValueError, match="at least one dimension"):
        memboost.pack_2bit(torch.tensor(1, dtype=torch.uint8, device=device))
