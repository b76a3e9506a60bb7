"""Minimal streaming safetensors reader/writer (no pickle, bf16 via ml_dtypes, clear errors naming the file).

The writer lays out the header from shapes and dtypes first, then streams tensors one at a time, so an export
never holds a second full copy of the parameters.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from unimedvl_jax.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(UserError):
    """A safetensors file is missing, truncated or not a safetensors file."""


class SafetensorsReader:
    """Read access to one safetensors file; tensors are read from disk one key at a time."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot open ({e.strerror})") from e
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self):
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{self.path}: not a safetensors file or truncated "
                                   f"(header length {header_len} vs file size {size})")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.entries = {}
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{self.path}: corrupt header entry for {key!r}: {info!r}") from e
            if not 0 <= begin <= end or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: corrupt header: tensor {key!r} of shape {shape} ({dtype}) "
                                       f"has data offsets [{begin}, {end})")
            self.entries[key] = (dtype, shape, begin, end)
        needed = max((end for _, _, _, end in self.entries.values()), default=0)
        if needed > data_size:
            raise SafetensorsError(f"{self.path}: truncated or corrupt (the header says {self._data_start + needed} "
                                   f"bytes, the file has {size})")

    def keys(self):
        return list(self.entries)

    def shape_dtype(self, key):
        dtype, shape, _, _ = self.entries[key]
        return shape, dtype

    def get(self, key) -> np.ndarray:
        """Tensor `key` as a (writable, freshly read) numpy array."""
        dtype, shape, begin, end = self.entries[key]
        # pread into a fresh buffer (no mmap): only this tensor's bytes are resident while it is in use.
        buf = bytearray(end - begin)
        view, offset = memoryview(buf), self._data_start + begin
        while view:
            n = os.preadv(self._file.fileno(), [view], offset)
            if n == 0:
                raise SafetensorsError(f"{self.path}: truncated while reading tensor {key!r}")
            view, offset = view[n:], offset + n
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_streaming(path, specs, produce, metadata=None):
    """Write a safetensors file from `specs` [(key, shape, dtype)], calling produce(key) per tensor, in order."""
    header, offset = {}, 0
    for key, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype in specs:
            arr = np.ascontiguousarray(np.asarray(produce(key)), dtype=np.dtype(dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {key!r} has shape {arr.shape}, expected {tuple(shape)}")
            f.write(arr.tobytes())
