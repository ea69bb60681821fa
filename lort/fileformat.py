"""The .lort file: a whole model, its LoRT layers and everything else it needs.

Little-endian throughout; u32/u64 unsigned integers; every data block starts
at an offset (from the file's start) that is a multiple of 64, zero bytes
filling the gap, so the reader can map each block as a tensor in place.

    header
      "LORT"             4 bytes, the magic (the seed's)
      u32 version        3 (2: the same without the checksums, still read; 1 was the
                         seed's file, which never stored A and B)
      u32 layer_count    LoRT layers that follow (the seed's field)
      u32 tensor_count   uncompressed tensors after the layers
      u64 meta_length    then meta_length bytes of UTF-8 JSON: {"config": the
                         Hugging Face config dict or null, "tokenizer": {file
                         name: text} or null, "info": {...}}
    layer_count times, a LoRT layer (W ~ alpha*T + A @ B.T, memboost.lort):
      u32 name_length, UTF-8 name (the weight's state_dict key, "....q_proj.weight")
      u32 dtype          the original weight's dtype code (below)
      u32 flags          bit 0: one alpha per row (else one for the matrix)
      u32 out, u32 in, u32 rank
      u64 packed_length  out * ceil(in / 128) * 32
      u32 crc32          (version 3) zlib's CRC-32 of the bytes of alpha, A, B and T
                         in that order (the padding between them not included)
      [align 64] alpha   f32 x (out if per-row else 1)
      [align 64] A       f16 [out, rank], row-major
      [align 64] B       f16 [in, rank], row-major
      [align 64] T       packed trits, memboost's one ternary layout
                         (csrc/common/trits.h, GGUF TQ2_0's byte order): per row,
                         in padded to 128 trits; in each 32-byte chunk trit
                         32*s + m sits in byte m at bits 2s..2s+1 as code t + 1
                         (00 = -1, 01 = 0, 10 = +1; 11 invalid; padding 01).
                         The seed's 4-trits-per-byte LSB-first 00/01/11 coding is
                         not this one; version 1 files are refused.
    tensor_count times, an uncompressed tensor (embeddings, norms, biases, small linears):
      u32 name_length, UTF-8 name
      u32 dtype, u32 ndim, ndim x u64 dims
      u64 nbytes         = product(dims) * itemsize
      u32 crc32          (version 3) zlib's CRC-32 of the data's nbytes bytes
      [align 64] data
    end of file: nothing may follow the last block.

dtype codes: 0 float32, 1 float16, 2 bfloat16, 3 int64, 4 int32, 5 uint8, 6 int8, 7 bool.

The reader memory-maps the file (copy-on-write, so the tensors are writable
without touching the file) and checks every length against the bytes left
before it maps anything, so a truncated or hostile file raises a
LortFileError (a memboost.MemboostError, a ValueError) naming the file, the
record and what is wrong; never a crash or an allocation beyond the file.
By default it also checks each record's CRC-32 (version 3), so damaged bytes
are named rather than computed with (load(path, verify=False) skips that).
The writer streams records to a temporary file next to the target, fsyncs
it and renames it into place (memboost.io.serialization.atomic_write).
"""

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from memboost import reference
from memboost.errors import MemboostError
from memboost.formats.lort import LoRTQuantizedTensor
from memboost.io.serialization import atomic_write
from memboost.formats.tensor import dtype_name

MAGIC = b"LORT"
VERSION = 3
READ_VERSIONS = (2, 3)  # version 2 files (before checksums) still load, unchecked
ALIGN = 64
MAX_NAME_BYTES = 4096
MAX_NDIM = 8
MAX_META_BYTES = 64 << 20  # config + tokenizer files; SmolLM2's are ~3.5 MB

DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.int64, 4: torch.int32, 5: torch.uint8,
          6: torch.int8, 7: torch.bool}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_LORT_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LortFileError(MemboostError):
    """A .lort file that cannot be read: names the file, the record and the problem."""


@dataclass
class LortFile:
    """What a .lort file holds: LoRT layers by weight name, the uncompressed
    tensors by name, and the metadata (config, tokenizer files, info)."""

    layers: Dict[str, LoRTQuantizedTensor] = field(default_factory=dict)
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def config(self) -> Optional[dict]:
        return self.meta.get("config")

    @property
    def tokenizer_files(self) -> Optional[Dict[str, str]]:
        return self.meta.get("tokenizer")


def _pad(offset: int) -> int:
    return -offset % ALIGN


def _raw_bytes(t: torch.Tensor):
    """A tensor's bytes (contiguous, on the CPU) as a buffer, without a copy where it already is one."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


# -- writing -------------------------------------------------------------------
class LortWriter:
    """Streams a .lort file: the counts are declared up front (they are in the
    header), records are written as they come, and the file appears at `path`
    only when close() finds every declared record written.

        with LortWriter(path, layer_count=2, tensor_count=1, meta={...}) as w:
            w.add_layer("a.weight", q1); w.add_layer("b.weight", q2); w.add_tensor("norm", t)
    """

    def __init__(self, path: str, layer_count: int, tensor_count: int, meta: Optional[dict] = None,
                 version: int = VERSION):
        # version=2 writes the file of lort before checksums (what older readers read)
        if version not in READ_VERSIONS:
            raise MemboostError(f"'version' must be one of {READ_VERSIONS}, got {version!r}")
        self.version = version
        meta_bytes = json.dumps(meta or {}, sort_keys=True).encode("utf-8")
        if len(meta_bytes) > MAX_META_BYTES:
            raise MemboostError(f"'meta' is {len(meta_bytes)} bytes of JSON, more than a .lort file holds "
                                f"({MAX_META_BYTES})")
        self.path = os.fspath(path)
        self._expected = (layer_count, tensor_count)
        self._written = [0, 0]
        self._names = set()
        self._atomic = atomic_write(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._f = open(tmp, "wb")
            self._offset = 0
            self._write(MAGIC + struct.pack("<IIIQ", version, layer_count, tensor_count, len(meta_bytes)))
            self._write(meta_bytes)
        except BaseException as exc:
            self._abort(exc)
            raise

    def _write(self, data) -> None:
        self._f.write(data)
        self._offset += len(data)

    def _block(self, data) -> None:
        self._write(b"\0" * _pad(self._offset))
        self._write(data)

    def _crc(self, blocks) -> bytes:
        """The record's u32 CRC-32 field (nothing in a version 2 file)."""
        if self.version < 3:
            return b""
        crc = 0
        for data in blocks:
            crc = zlib.crc32(data, crc)
        return struct.pack("<I", crc)

    def _name(self, name: str) -> None:
        if not isinstance(name, str) or name in self._names:
            raise MemboostError(f"record name {name!r} must be a string not used before in this file")
        raw = name.encode("utf-8")
        if not 0 < len(raw) <= MAX_NAME_BYTES:
            raise MemboostError(f"record name {name[:40]!r}... must be 1 to {MAX_NAME_BYTES} bytes of UTF-8")
        self._names.add(name)
        self._write(struct.pack("<I", len(raw)) + raw)

    def add_layer(self, name: str, q: LoRTQuantizedTensor) -> None:
        if not isinstance(q, LoRTQuantizedTensor):
            raise MemboostError(f"layer {name!r}: expected a LoRTQuantizedTensor, got {type(q).__name__}")
        if self._written[1] or self._written[0] >= self._expected[0]:
            raise MemboostError(f"layer {name!r}: all {self._expected[0]} declared layers come before the tensors")
        n, k = q.shape
        t = q.tensors
        blocks = [_raw_bytes(t[key]) for key in ("alpha", "A", "B", "packed")]
        self._name(name)
        self._write(struct.pack("<IIIIIQ", DTYPE_CODES[q.dtype], int(q.per_row_alpha), n, k, q.rank,
                                t["packed"].numel()) + self._crc(blocks))
        for data in blocks:
            self._block(data)
        self._written[0] += 1

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        if self._written[0] != self._expected[0] or self._written[1] >= self._expected[1]:
            raise MemboostError(f"tensor {name!r}: expected {self._expected[0]} layers first and at most "
                                f"{self._expected[1]} tensors")
        if not isinstance(t, torch.Tensor) or t.dtype not in DTYPE_CODES or t.dim() > MAX_NDIM:
            got = f"{t.dtype}, {t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
            raise MemboostError(f"tensor {name!r}: a .lort file stores tensors of {sorted(map(str, DTYPE_CODES))} "
                                f"with at most {MAX_NDIM} dimensions, got {got}")
        data = _raw_bytes(t)
        self._name(name)
        self._write(struct.pack("<II", DTYPE_CODES[t.dtype], t.dim()) + struct.pack(f"<{t.dim()}Q", *t.shape)
                    + struct.pack("<Q", t.numel() * t.element_size()) + self._crc([data]))
        self._block(data)
        self._written[1] += 1

    def close(self) -> None:
        if tuple(self._written) != self._expected:
            exc = MemboostError(f"{self.path!r}: declared {self._expected[0]} layers and {self._expected[1]} tensors, "
                                f"wrote {self._written[0]} and {self._written[1]}")
            self._abort(exc)
            raise exc
        self._f.close()
        self._atomic.__exit__(None, None, None)

    def _abort(self, exc: BaseException) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()
        self._atomic.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary file

    def __enter__(self) -> "LortWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self._abort(exc)


def save(path: str, layers: Dict[str, LoRTQuantizedTensor], tensors: Optional[Dict[str, torch.Tensor]] = None,
         meta: Optional[dict] = None) -> None:
    """Writes a whole .lort file at once (atomically)."""
    tensors = tensors or {}
    with LortWriter(path, len(layers), len(tensors), meta) as w:
        for name, q in layers.items():
            w.add_layer(name, q)
        for name, t in tensors.items():
            w.add_tensor(name, t)


# -- reading -------------------------------------------------------------------
class _Cursor:
    def __init__(self, path: str, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0
        self.record = "header"
        self.verify = False  # set when the file has checksums and they are checked
        self.crc = 0  # CRC-32 of the data blocks read since the last reset (record by record)

    def fail(self, what: str) -> "LortFileError":
        return LortFileError(f"{self.path!r}: {self.record}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, only {self.size - self.pos} "
                            "left in the file")

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def name(self) -> str:
        (length,) = self.unpack("<I", "name length")
        if not 0 < length <= MAX_NAME_BYTES:
            raise self.fail(f"name length {length} is not between 1 and {MAX_NAME_BYTES}")
        self.need(length, "name")
        try:
            name = bytes(self.buf[self.pos:self.pos + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("name is not valid UTF-8") from None
        self.pos += length
        return name

    def tensor(self, dtype: torch.dtype, shape: tuple, what: str) -> torch.Tensor:
        self.pos += _pad(self.pos)
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        self.need(count * itemsize, f"{what} ({dtype_name(dtype)} {list(shape)})")
        if count == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(self.buf, dtype=torch.uint8, count=count * itemsize, offset=self.pos)
            if self.verify:
                self.crc = zlib.crc32(t.numpy(), self.crc)
            if dtype == torch.bool and bool((t > 1).any()):
                raise self.fail(f"{what}: bool values must be bytes 0 or 1")
            t = t.view(dtype).reshape(shape)
        self.pos += count * itemsize
        return t


    def check_crc(self, expected: Optional[int]) -> None:
        """The record's data blocks against its saved CRC-32 (when verifying)."""
        if self.verify and self.crc != expected:
            raise self.fail(f"damaged: its bytes do not match the checksum saved with them (CRC-32 {self.crc:08x}, "
                            f"saved {expected:08x}); restore the file from a good copy (load(path, verify=False) / "
                            "--no-verify reads it anyway)")
        self.crc = 0


def load(path: str, verify: bool = True) -> LortFile:
    """Reads a .lort file, memory-mapped: the tensors share the mapping's pages
    (copy-on-write) and are checked before anything is built from them.
    `verify` checks each record's CRC-32 (version 3 files): one pass over the
    bytes, which also brings them into memory; False skips it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LortFileError(f"{path!r} is not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 24:
            head = f.read(4)
            what = "not a .lort file" if head[:len(head)] != MAGIC[:len(head)] or not head else "truncated header"
            raise LortFileError(f"{path!r}: {what} ({size} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(path, buf, size)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise LortFileError(f"{path!r}: not a .lort file (starts with {magic!r}, expected {MAGIC!r})")
    cur.pos = 4
    version, layer_count, tensor_count, meta_length = cur.unpack("<IIIQ", "header")
    if version not in READ_VERSIONS:
        why = ("version 1 was the seed's file, which stored neither A nor B"
               if version == 1 else "upgrade lort" if version > VERSION else "unknown version")
        raise LortFileError(f"{path!r}: .lort version {version} is not supported (this reader reads versions "
                            f"{', '.join(map(str, READ_VERSIONS))}; {why})")
    cur.verify = verify and version >= 3
    if meta_length > MAX_META_BYTES:
        raise cur.fail(f"metadata length {meta_length} exceeds {MAX_META_BYTES}")
    cur.need(meta_length, "metadata")
    try:
        meta = json.loads(bytes(buf[cur.pos:cur.pos + meta_length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise cur.fail(f"metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise cur.fail(f"metadata must be a JSON object, got {type(meta).__name__}")
    cur.pos += meta_length
    # Every record takes at least 30 bytes: counts beyond that are corrupt, not a reason to loop.
    if layer_count + tensor_count > (size - cur.pos) // 30:
        raise cur.fail(f"{layer_count} layers and {tensor_count} tensors cannot fit in the {size - cur.pos} bytes "
                       "left")
    out = LortFile(meta=meta)
    for i in range(layer_count):
        cur.record = f"layer {i}"
        name = cur.name()
        cur.record = f"layer {i} ({name!r})"
        if name in out.layers:
            raise cur.fail("a layer of this name came before")
        dtype_code, flags, n, k, rank, packed_len = cur.unpack("<IIIIIQ", "layer header")
        (crc,) = cur.unpack("<I", "checksum") if version >= 3 else (None,)
        if DTYPES.get(dtype_code) not in _LORT_WEIGHT_DTYPES:
            raise cur.fail(f"weight dtype code {dtype_code} is not one of float32 (0), float16 (1), bfloat16 (2)")
        if flags & ~1:
            raise cur.fail(f"unknown flags {flags:#x}")
        if n < 1 or k < 1:
            raise cur.fail(f"shape [{n}, {k}] must have out >= 1 and in >= 1")
        if rank > min(n, k):
            raise cur.fail(f"rank {rank} exceeds min(out, in) = {min(n, k)}")
        row_bytes = reference.ternary_row_bytes(k)
        if packed_len != n * row_bytes:
            raise cur.fail(f"packed length {packed_len} disagrees with the shape [{n}, {k}] (expected {n * row_bytes})")
        alpha = cur.tensor(torch.float32, (n if flags & 1 else 1, 1), "alpha")
        a = cur.tensor(torch.float16, (n, rank), "A")
        b = cur.tensor(torch.float16, (k, rank), "B")
        packed = cur.tensor(torch.uint8, (n, row_bytes), "packed trits")
        cur.check_crc(crc)
        try:
            out.layers[name] = LoRTQuantizedTensor({"packed": packed, "alpha": alpha, "A": a, "B": b},
                                                   {"shape": [n, k], "dtype": dtype_name(DTYPES[dtype_code])})
        except MemboostError as exc:
            raise cur.fail(str(exc)) from None
    for i in range(tensor_count):
        cur.record = f"tensor {i}"
        name = cur.name()
        cur.record = f"tensor {i} ({name!r})"
        if name in out.tensors or name in out.layers:
            raise cur.fail("a record of this name came before")
        dtype_code, ndim = cur.unpack("<II", "tensor header")
        if dtype_code not in DTYPES:
            raise cur.fail(f"unknown dtype code {dtype_code}")
        if ndim > MAX_NDIM:
            raise cur.fail(f"{ndim} dimensions (at most {MAX_NDIM})")
        shape = cur.unpack(f"<{ndim}Q", "dimensions")
        (nbytes,) = cur.unpack("<Q", "byte count")
        (crc,) = cur.unpack("<I", "checksum") if version >= 3 else (None,)
        itemsize = torch.empty((), dtype=DTYPES[dtype_code]).element_size()
        count = 1
        for s in shape:
            count *= s
        if nbytes != count * itemsize:
            raise cur.fail(f"byte count {nbytes} disagrees with shape {list(shape)} of "
                           f"{dtype_name(DTYPES[dtype_code])}")
        out.tensors[name] = cur.tensor(DTYPES[dtype_code], tuple(shape), "data")
        cur.check_crc(crc)
    cur.record = "end of file"
    if cur.pos != size:
        raise cur.fail(f"{size - cur.pos} unexpected bytes after the last record")
    return out
