"""Reading a safetensors file once: each byte straight into the tensor that holds it, hashed on the way.

``safetensors.torch.load(data)`` needs the whole file as ``bytes`` and copies every tensor out of
them, so a checkpoint read that way is held twice at its peak, and copied twice. Here the header
is parsed first and each tensor gets its own storage, which the file is read into in chunks that
are hashed while they are still in the cache. The format (an 8-byte little-endian header length,
a JSON header of ``{name: {dtype, shape, data_offsets}}`` and an optional ``__metadata__``, then
the tensors' bytes with no holes) is checked as strictly as safetensors checks it; a header with
a dtype this table does not know is handed to safetensors' own loader.
"""

from __future__ import annotations

import json
import math
from typing import BinaryIO

import torch
from safetensors.torch import load as load_safetensors_bytes

# The format's dtype names (safetensors' spec).
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}
CHUNK = 1 << 24  # 16 MiB: hashed while it is still in the cache
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class MalformedFile(ValueError):
    """The bytes are not a safetensors file (the message says what is wrong)."""


def read_tensors(f: BinaryIO, size: int, hasher) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of the safetensors file ``f`` of ``size`` bytes, every byte read once
    and fed to ``hasher.update``. Raises :class:`MalformedFile` (after hashing the whole file, so a
    corrupted file can be reported as such first) or ``EOFError`` when the file ends early."""
    if size < 8:
        hash_rest(f, hasher)
        raise MalformedFile(f"it has {size} bytes, fewer than its 8-byte header length")
    head = read_exact(f, 8, hasher)
    header_len = int.from_bytes(head, "little")
    if header_len > min(size - 8, MAX_HEADER):
        hash_rest(f, hasher)
        raise MalformedFile(f"its header claims {header_len} bytes, the file has {size - 8} after the length")
    header = read_exact(f, header_len, hasher)
    try:
        layout, metadata = parse_header(header, size - 8 - header_len)
    except MalformedFile:
        hash_rest(f, hasher)
        raise
    if layout is None:  # a dtype missing from DTYPES: safetensors reads it
        rest = read_exact(f, size - 8 - header_len, hasher)
        return load_safetensors_bytes(head + header + rest), metadata
    tensors = {}
    for name, dtype, shape, nbytes in layout:
        storage = torch.empty(nbytes, dtype=torch.uint8)
        read_into(f, storage.numpy(), hasher)
        tensors[name] = storage.view(dtype).reshape(shape)
    return tensors, metadata


def parse_header(header: bytes, data_len: int):
    """``(layout, metadata)``: layout is ``[(name, dtype, shape, nbytes)]`` in file order, the
    tensors tiling ``data_len`` bytes exactly (None when a dtype is not in :data:`DTYPES`)."""
    try:
        parsed = json.loads(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedFile(f"its header is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise MalformedFile("its header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MalformedFile("its __metadata__ is not a mapping of strings")
    entries = sorted((_entry(name, info) for name, info in parsed.items()), key=lambda e: e[3])
    end = 0
    for name, _, _, begin, stop, _ in entries:
        if begin != end:
            raise MalformedFile(f"tensor {name!r} starts at byte {begin}, the previous one ends at {end}")
        end = stop
    if end != data_len:
        raise MalformedFile(f"its tensors cover {end} bytes, the file holds {data_len}")
    if any(dtype is None for _, dtype, *_ in entries):
        return None, metadata
    return [(name, dtype, shape, stop - begin) for name, dtype, shape, begin, stop, _ in entries], metadata


def _entry(name: str, info) -> tuple:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise MalformedFile(f"tensor {name!r} has no dtype, shape and data_offsets")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise MalformedFile(f"tensor {name!r} has the shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise MalformedFile(f"tensor {name!r} has the data_offsets {offsets!r}")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is not None:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise MalformedFile(f"tensor {name!r} ({dtype_name}{shape}) needs {nbytes} bytes, "
                                f"its data_offsets give {offsets[1] - offsets[0]}")
    return name, dtype, shape, offsets[0], offsets[1], dtype_name


def read_exact(f: BinaryIO, n: int, hasher) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"the file ended after {len(data)} of {n} bytes")
    hasher.update(data)
    return data


def read_into(f: BinaryIO, out, hasher) -> None:
    """Fill the byte array ``out`` from ``f`` chunk by chunk, hashing each chunk as it lands."""
    view = memoryview(out).cast("B")
    for start in range(0, len(view), CHUNK):
        chunk = view[start:start + CHUNK]
        got = f.readinto(chunk)
        while got < len(chunk):  # a short read: the rest of the chunk
            more = f.readinto(chunk[got:])
            if not more:
                raise EOFError(f"the file ended {len(view) - start - got} bytes early")
            got += more
        hasher.update(chunk)


def hash_rest(f: BinaryIO, hasher) -> None:
    for chunk in iter(lambda: f.read(CHUNK), b""):
        hasher.update(chunk)
