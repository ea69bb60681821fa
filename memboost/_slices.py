"""Row slices of large tensors: how much of a big matrix a pass over it
holds at once. A pass that makes temporaries (a float32 copy, a comparison
mask) makes them one slice at a time, so its memory is a slice's, not a
copy of a 0.5 G-weight output layer's (2 GiB in float32 for 128256 x 4096)."""
from math import prod
from typing import Iterator, Optional, Sequence

import torch

SLICE_ELEMENTS = 1 << 24   # elements per slice (64 MiB of float32)


def rows_per_slice(shape: Sequence[int], elements: Optional[int] = None) -> int:
    """Leading-dimension rows per slice of about `elements` elements
    (SLICE_ELEMENTS by default), at least one row."""
    return max(1, (elements or SLICE_ELEMENTS) // max(1, prod(shape[1:])))


def row_slices(t: torch.Tensor, elements: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Views of `t`'s leading-dimension rows, about `elements` elements each."""
    step = rows_per_slice(t.shape, elements)
    for start in range(0, t.shape[0], step):
        yield t[start:start + step]
