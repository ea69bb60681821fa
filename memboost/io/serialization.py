"""Saving and loading state_dicts as safetensors files, safely.

Every file memboost writes goes through atomic_write: a temporary file in the
target's folder, flushed and fsync'ed, then renamed over the target, so an
interrupted or failed save never leaves a half-written file where a good one
was. A load names the file and what is wrong with it (missing, truncated,
not safetensors at all).

Tied weights (a model whose lm_head shares the embedding's tensor) are saved
once: the other names are recorded as aliases in the file's metadata and
restored, as the same tensor, on load.

Every file save_safetensors writes also records a CRC-32 of each tensor's
bytes in its metadata (CHECKSUMS_KEY); loads check them by default
(verify=False skips it) and name the damaged tensor and file. A file written
before checksums existed (no such key) loads unchecked.
"""

import contextlib
import json
import os
import re
import struct
import tempfile
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import MemboostError, MemboostTypeError

ALIASES_KEY = "memboost.aliases"  # safetensors metadata: JSON {alias name: stored name}
CHECKSUMS_KEY = "memboost.crc32"  # safetensors metadata: JSON {stored name: CRC-32 of its bytes, 8 hex digits}


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str, folder: bool = False) -> None:
    """Gives a file (or folder) that tempfile created, 0600 (0700), the mode a
    plain open() (os.mkdir) would have: 0666 (0777) less the user's umask,
    before it is renamed into place."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def check_output_path(path: str, folder: bool = False) -> str:
    """The absolute form of `path` if a file (folder=True: a folder, replaced
    as a whole) can be written there: its parent folder exists and is
    writable, and it is not something of the other kind. What atomic_write
    and save_quantized check; a command checks it before any long work."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise MemboostError(f"cannot write {path!r}: folder {parent!r} does not exist")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise MemboostError(f"cannot write {path!r}: it exists and is not a folder")
    if not folder and os.path.isdir(path):
        raise MemboostError(f"cannot write {path!r}: it is a folder; give a file name (e.g. "
                            f"{os.path.join(path, 'model' + (os.path.splitext(path)[1] or '.out'))!r})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MemboostError(f"cannot write {path!r}: folder {parent!r} is not writable")
    return path


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[str]:
    """Yields a temporary path next to `path`; when the block completes, the
    file there is fsync'ed and renamed over `path` (and the folder fsync'ed).
    On any error the temporary file is removed and `path` is untouched. The
    file gets the user's umask, as open() would give it."""
    path = os.fspath(path)
    folder = os.path.dirname(check_output_path(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MemboostError(f"cannot write {path!r}: {exc.strerror}") from exc
    os.close(fd)
    try:
        yield tmp
        apply_umask(tmp)  # after the block: a writer may have replaced the file mkstemp made
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _split_aliases(state: Dict[str, torch.Tensor]):
    """(tensors to store, {alias: stored name}): a name whose tensor is the
    very same view of the same memory as an earlier name's becomes an alias;
    a tensor sharing memory with an earlier one in another way is stored as
    a copy (safetensors refuses shared memory)."""
    views: Dict[tuple, str] = {}
    storages = set()
    stored, aliases = {}, {}
    for name, t in state.items():
        if t.numel() == 0:
            stored[name] = t
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = storage + (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        stored[name] = t.clone() if storage in storages else t
        storages.add(storage)
    return stored, aliases


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 (zlib's) of a tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def save_safetensors(state: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes `state` (a flat dict of tensors, e.g. a model's state_dict with
    quantized layers) to `path` atomically. Tied tensors are stored once; each
    stored tensor's CRC-32 goes into the metadata (CHECKSUMS_KEY)."""
    from safetensors.torch import save_file

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MemboostTypeError("'state' must be a dict of str -> torch.Tensor")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise MemboostTypeError("'metadata' must be a dict of str -> str")
    stored, aliases = _split_aliases(state)
    metadata = dict(metadata or {})
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    stored = {k: v.detach().contiguous().cpu() for k, v in stored.items()}
    metadata[CHECKSUMS_KEY] = json.dumps({k: f"{tensor_crc32(v):08x}" for k, v in stored.items()}, sort_keys=True)
    with atomic_write(path) as tmp:
        save_file(stored, tmp, metadata=metadata)


_CRC_CHUNK = 16 << 20  # bytes read at a time while checking a tensor


class FileChecksums:
    """Where each tensor's bytes lie in a safetensors file (`offsets`: name
    -> (start, end) in the file, read from its header) and the CRC-32s its
    metadata records (CHECKSUMS_KEY; `ranges`: name -> (start, end, crc));
    `verify(names)` reads those bytes back and raises MemboostError naming
    the first tensor whose bytes changed. `recorded` is False for a file
    written without checksums (verify then checks nothing). Call it on a
    file whose header check_safetensors_header (or safetensors) accepted."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.offsets: Dict[str, Tuple[int, int]] = {}  # name -> (start, end in the file)
        self.ranges: Dict[str, Tuple[int, int, int]] = {}  # name -> (start, end in the file, crc)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(header_len))
            except (ValueError, RecursionError) as exc:
                raise MemboostError(f"{self.path!r} is not a safetensors file: its header is not JSON "
                                    f"({exc})") from None
        size = os.path.getsize(self.path)
        if not isinstance(header, dict):
            raise MemboostError(f"{self.path!r} is not a safetensors file: its header is not a JSON object")
        data_start = 8 + header_len
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= size - data_start):
                raise MemboostError(f"{self.path!r}: tensor {name!r} has invalid data_offsets {offsets!r}")
            self.offsets[name] = (data_start + offsets[0], data_start + offsets[1])
        metadata = header.get("__metadata__")
        text = metadata.get(CHECKSUMS_KEY) if isinstance(metadata, dict) else None
        self.recorded = text is not None
        if not self.recorded:
            return
        try:
            checksums = json.loads(text)
            ok = isinstance(checksums, dict) and all(isinstance(v, str) and len(v) == 8 for v in checksums.values())
            checksums = {k: int(v, 16) for k, v in checksums.items()} if ok else None
        except (ValueError, TypeError, RecursionError):
            checksums = None
        if checksums is None:
            raise MemboostError(f"{self.path!r}: metadata '{CHECKSUMS_KEY}' must map tensor names to 8 hex digits "
                                "(damaged header?)")
        for name, (start, end) in self.offsets.items():
            if name not in checksums:
                raise MemboostError(f"{self.path!r}: tensor {name!r} has no checksum in '{CHECKSUMS_KEY}' (damaged "
                                    "header?)")
            self.ranges[name] = (start, end, checksums.pop(name))
        if checksums:
            raise MemboostError(f"{self.path!r}: '{CHECKSUMS_KEY}' lists tensor(s) the file does not hold, e.g. "
                                f"{sorted(checksums)[:3]} (damaged header?)")

    def verify(self, names: Optional[List[str]] = None) -> None:
        """Checks the named tensors (all when None) against their recorded CRC-32."""
        if not self.recorded:
            return
        buf = bytearray(min(_CRC_CHUNK, max((e - s for s, e, _ in self.ranges.values()), default=0)))
        view = memoryview(buf)
        with open(self.path, "rb") as f:
            for name in self.ranges if names is None else names:
                start, end, _ = self.ranges[name]
                f.seek(start)
                crc, left = 0, end - start
                while left:
                    n = f.readinto(view[:min(left, len(buf))])
                    if not n:
                        raise MemboostError(f"{self.path!r}: tensor {name!r} is truncated")
                    crc = zlib.crc32(view[:n], crc)
                    left -= n
                self.check(name, crc)

    def check(self, name: str, crc: int) -> None:
        """Raises MemboostError when `crc`, the CRC-32 of tensor `name`'s bytes as read, is not the recorded one."""
        if not self.recorded:
            return
        expected = self.ranges[name][2]
        if crc != expected:
            raise MemboostError(f"{self.path!r}: tensor {name!r} is damaged: its bytes do not match the "
                                f"checksum saved with them (CRC-32 {crc:08x}, saved {expected:08x}); "
                                "restore the file from a good copy (verify=False / --no-verify loads it "
                                "anyway)")


def check_safetensors_header(path: str) -> int:
    """Checks that `path` starts like a safetensors file that fits its size
    (8-byte little-endian header length, then a JSON object); returns the
    file size. Names the file and what it is instead when it is not."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8 and head[8:9] == b"{":
            return size
    # Not a safetensors start: say what it is, when that is recognisable.
    if head[:4] == b"PK\x03\x04":
        raise MemboostError(f"{path!r} is not a safetensors file: it is a zip archive, as torch.save writes "
                            "(load it with torch.load(path, weights_only=True))")
    if head[:1] == b"\x80":
        raise MemboostError(f"{path!r} is not a safetensors file: it looks like a pickle")
    if len(head) < 9:
        raise MemboostError(f"{path!r} is not a safetensors file: only {size} bytes long")
    raise MemboostError(f"{path!r} is not a safetensors file (or is truncated): its first 8 bytes give a header "
                        f"of {header_len} bytes in a file of {size} bytes")


@contextlib.contextmanager
def open_safetensors(path: str, device: str = "cpu"):
    """safetensors' safe_open on `path`, its header checked first
    (check_safetensors_header) and safetensors' or torch's errors while the
    file is open raised as MemboostError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MemboostError(f"{path!r} is not a file")
    check_safetensors_header(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MemboostError(f"{path!r} is not a complete safetensors file (truncated or corrupt?): {exc}") from exc


def load_safetensors(path: str, device: str = "cpu", verify: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on `device` (tied names restored).
    `verify` checks each tensor's bytes against the CRC-32 saved with them
    (MemboostError naming a damaged tensor); False skips that read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MemboostError(f"'path' {path!r} is not a file")
    with open_safetensors(path, device) as f:
        if verify:
            FileChecksums(path).verify()
        metadata = f.metadata() or {}
        state = {name: f.get_tensor(name) for name in f.keys()}
    if ALIASES_KEY in metadata:
        try:
            aliases = json.loads(metadata[ALIASES_KEY])
            ok = isinstance(aliases, dict) and all(isinstance(v, str) and v in state for v in aliases.values())
        except ValueError:
            ok = False
        if not ok:
            raise MemboostError(f"{path!r}: metadata '{ALIASES_KEY}' must map names to stored tensors")
        for alias, name in aliases.items():
            state.setdefault(alias, state[name])
    return state


# -- reading a model's safetensors lazily --------------------------------------
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_MADV_DONTNEED = 4   # Linux


def release_mapped_pages() -> int:
    """Drops this process's resident pages of memory-mapped safetensors
    files (Linux; elsewhere a no-op); returns the size of the maps dropped. A model
    whose tensors are mapped from its files (load_quantized, load_mapped)
    keeps every page it has read in its resident memory until the maps go;
    a pass that reads each tensor once (the GGUF export) calls this after
    each one, so that it holds one tensor's pages, not the model's. The
    pages stay in the kernel's page cache and a later read maps them again.
    Only maps of a *.safetensors file that are readable, not executable and
    hold no page of their own (smaps' Anonymous: 0 kB: nothing was written
    to them) are dropped, so no data can be lost."""
    import ctypes
    import ctypes.util

    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    candidates, current = [], None
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):   # a map's first line
            current = None
            perms, path = fields[1], fields[5] if len(fields) > 5 else ""
            if path.endswith(".safetensors") and perms.startswith("r") and "x" not in perms:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                current = [start, end, None]
                candidates.append(current)
        elif current is not None and fields and fields[0] == "Anonymous:":
            current[2] = int(fields[1])
    if not candidates:
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dropped = 0
    for start, end, anonymous in candidates:
        if anonymous == 0 and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


class SafetensorsSource:
    """A model's tensors in safetensors form, read one at a time through
    safetensors' memory map (so a model larger than RAM can be processed
    tensor by tensor): one file, a folder with `model.safetensors`, or a
    folder of shards `model-0000N-of-0000M.safetensors` found through
    `model.safetensors.index.json` (or, without an index, as a complete set).
    Tied names recorded by save_safetensors/save_quantized are restored, and
    with `verify` each tensor's saved CRC-32 (if the file has them) is checked
    when get() reads it.

        with SafetensorsSource("model_dir") as src:
            for name in src.names():
                shape, dtype = src.shape(name), src.dtype(name)
                t = src.get(name)
    """

    def __init__(self, path: str, verify: bool = True):
        from safetensors import SafetensorError

        self._error = SafetensorError
        path = os.fspath(path)
        self.path = path
        self.files = _model_files(path)
        self._stack = contextlib.ExitStack()
        self._handles = {}
        self._where: Dict[str, str] = {}
        self._checksums: Dict[str, FileChecksums] = {}
        self._layouts: Dict[str, FileChecksums] = {}
        self.aliases: Dict[str, str] = {}
        for file in self.files:
            handle = self._open(file)
            if verify:  # each tensor is checked when get() reads it
                self._checksums[file] = self._layouts[file] = FileChecksums(file)
            for name in handle.keys():
                self._where.setdefault(name, file)
            metadata = handle.metadata() or {}
            if ALIASES_KEY in metadata:
                self.aliases.update(_parse_aliases(metadata[ALIASES_KEY], file))
        if not self._where:
            raise MemboostError(f"{path!r} holds no tensors")
        for alias, name in list(self.aliases.items()):
            if name not in self._where:
                raise MemboostError(f"{path!r}: alias {alias!r} names a tensor that is not stored: {name!r}")

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(open_safetensors(file))
        return self._handles[file]

    def names(self) -> List[str]:
        """Stored tensor names, file by file in shard order (aliases not included)."""
        return list(self._where)

    def has(self, name: str) -> bool:
        """Whether the source holds `name` (stored, or as an alias of a stored tensor)."""
        return self.aliases.get(name, name) in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise MemboostError(f"{self.path!r} has no tensor {name!r}")
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors' dtype name ("F32", "F16", "BF16", "I64", ...)."""
        return self._slice(name).get_dtype()

    def torch_dtype(self, name: str):
        """The torch dtype of a tensor, or safetensors' name of a dtype torch has no match for here."""
        return _SAFETENSORS_DTYPES.get(self.dtype(name), self.dtype(name))

    def get(self, name: str, device: str = "cpu", mapped: bool = True) -> torch.Tensor:
        """The tensor `name`. mapped=True: a view of safetensors' memory map
        of the file (nothing copied; the pages read stay in this process's
        resident memory, as the file's, until the source is closed).
        mapped=False: its bytes read into memory of its own, given back when
        the tensor is freed (a model read block by block then holds one
        block's pages at a time, not every page it read)."""
        name = self.aliases.get(name, name)
        self._slice(name)  # names the tensor when it is missing
        file = self._where[name]
        if not mapped:
            t = self._read(file, name)
            return t if str(device) == "cpu" else t.to(device)
        checksums = self._checksums.get(file)
        if checksums is not None:
            checksums.verify([name])
        try:
            t = self._handles[file].get_tensor(name)
        except (self._error, OSError, RuntimeError) as exc:
            raise MemboostError(f"{file!r}: tensor {name!r} cannot be read (truncated or "
                                f"corrupt?): {exc}") from exc
        return t if str(device) == "cpu" else t.to(device)

    def _read(self, file: str, name: str) -> torch.Tensor:
        """get(mapped=False): the bytes read with plain reads into a new tensor, its CRC-32 checked on them."""
        dtype, shape = self.torch_dtype(name), self.shape(name)
        if not isinstance(dtype, torch.dtype):
            raise MemboostError(f"{file!r}: tensor {name!r} has dtype {dtype!r}, which torch cannot hold")
        if file not in self._layouts:
            self._layouts[file] = FileChecksums(file)
        layout = self._layouts[file]
        start, end = layout.offsets[name]
        numel = 1
        for n in shape:
            numel *= n
        if end - start != numel * dtype.itemsize:   # safetensors checked the header; a cheap guard all the same
            raise MemboostError(f"{file!r}: tensor {name!r} spans {end - start} bytes, its shape {list(shape)} and "
                                f"dtype {dtype} need {numel * dtype.itemsize}")
        if not numel:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        checking = file in self._checksums and name in layout.ranges   # verify=True and the file has CRC-32s
        crc, done = 0, 0
        with open(file, "rb", buffering=0) as f:
            f.seek(start)
            while done < end - start:
                n = f.readinto(view[done:done + min(_CRC_CHUNK, end - start - done)])
                if not n:
                    raise MemboostError(f"{file!r}: tensor {name!r} is truncated: {done} of its {end - start} bytes "
                                        "are in the file")
                if checking:
                    crc = zlib.crc32(view[done:done + n], crc)
                done += n
        if checking:
            layout.check(name, crc)
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_aliases(text: str, where: str) -> Dict[str, str]:
    try:
        aliases = json.loads(text)
        ok = isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())
    except ValueError:
        ok = False
    if not ok:
        raise MemboostError(f"{where!r}: metadata '{ALIASES_KEY}' must map names to stored tensors")
    return aliases


INDEX_NAME = "model.safetensors.index.json"


def read_safetensors_index(directory: str) -> Optional[Tuple[List[str], Dict[str, str], Dict[str, str]]]:
    """(shard paths in order, weight_map, aliases) of `directory`'s
    model.safetensors.index.json, validated (every shard a file in the
    folder); None when the folder has no index."""
    index_path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(index_path):
        return None
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MemboostError(f"{index_path!r} is not a valid safetensors index ({exc!r})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    metadata = index.get("metadata", {}) if isinstance(index, dict) else None
    aliases = metadata.get(ALIASES_KEY, {}) if isinstance(metadata, dict) else None
    if not (isinstance(weight_map, dict) and isinstance(aliases, dict) and
            all(isinstance(v, str) for v in aliases.values())):
        raise MemboostError(f"{index_path!r} is not a valid safetensors index: expected a JSON object with a "
                            f"'weight_map' object and an optional 'metadata' object (aliases: name -> name)")
    paths = []
    for filename in sorted(set(weight_map.values()), key=str):
        if not isinstance(filename, str) or os.path.basename(filename) != filename:
            raise MemboostError(f"{index_path!r} names a shard outside the folder: {filename!r}")
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            raise MemboostError(f"shard {filename!r} listed in {index_path!r} is missing")
        paths.append(path)
    return paths, weight_map, aliases


def _model_files(path: str) -> List[str]:
    """The safetensors files of a model path, in load order."""
    if os.path.isfile(path):
        check_safetensors_header(path)
        return [path]
    if not os.path.isdir(path):
        raise MemboostError(f"model path {path!r} does not exist")
    index = read_safetensors_index(path)
    if index is not None:
        return index[0]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    shards = sorted(f for f in os.listdir(path) if _SHARD_NAME.match(f))
    if shards:
        m = _SHARD_NAME.match(shards[0])
        stem, total = m["stem"], int(m["n"])
        want = [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        missing = [w for w in want if w not in shards]
        if missing:
            raise MemboostError(f"{path!r}: shard {missing[0]!r} of the set {stem}-*-of-{total:05d} is missing")
        return [os.path.join(path, w) for w in want]
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(others) == 1:
        return [os.path.join(path, others[0])]
    raise MemboostError(f"{path!r} holds no model.safetensors, no safetensors index and no shard set"
                        + (f" (found {others[:3]}: name one file)" if others else ""))
