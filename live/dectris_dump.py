"""DECTRIS SIMPLON stream v1 messages, written as a dump file LiberTEM-live's DectrisSim replays.

A dump is a sequence of records ``[int64 little-endian length][message bytes]``: the series
header, the detector configuration, then per frame the four parts (``dimage-1.0``,
``dimage_d-1.0``, payload, ``dconfig-1.0``), then ``dseries_end-1.0``
(../shared/notes/dectris-stream.md).  Payloads are compressed as a DCU sends them:
``bs<bits>-lz4<`` is one HDF5 Bitshuffle/LZ4 chunk (hdf5plugin's filter, read back raw with
``read_direct_chunk``), ``lz4<`` a bare LZ4 block.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

ENCODINGS = ("bslz4", "lz4")
DTYPES = {np.dtype("uint8"): "uint8", np.dtype("uint16"): "uint16", np.dtype("uint32"): "uint32"}


def detector_dtype(dtype) -> np.dtype:
    """The unsigned type a counting detector sends for data of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype in DTYPES:
        return dtype
    if dtype.kind in "iu" and dtype.itemsize <= 4:
        return np.dtype(f"uint{max(8, dtype.itemsize * 8)}")
    return np.dtype("uint32")


def to_detector_frames(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Counts as the detector would send them: rounded, clipped to the type's range."""
    if frames.dtype == dtype:
        return frames
    info = np.iinfo(dtype)
    return np.clip(np.rint(frames), 0, info.max).astype(dtype)


class BitshuffleLZ4:
    """Bitshuffle+LZ4 chunks exactly as a DCU (and HDF5's filter 32008) produce them."""

    def __init__(self, frame_shape: tuple[int, int], dtype: np.dtype):
        import h5py
        import hdf5plugin

        self._file = h5py.File(io.BytesIO(), "w")
        self._ds = self._file.create_dataset("f", shape=(1, *frame_shape), chunks=(1, *frame_shape), dtype=dtype,
                                             **hdf5plugin.Bitshuffle(cname="lz4"))

    def __call__(self, frame: np.ndarray) -> bytes:
        self._ds[0] = frame
        return bytes(self._ds.id.read_direct_chunk((0, 0, 0))[1])


def lz4_block(frame: np.ndarray) -> bytes:
    """A bare LZ4 block (DECTRIS ``lz4<``): numcodecs' LZ4 minus its 4-byte size prefix."""
    from numcodecs import LZ4

    return bytes(LZ4().encode(np.ascontiguousarray(frame)))[4:]


def _record(fh, message: bytes | dict) -> None:
    if isinstance(message, dict):
        message = json.dumps(message).encode()
    fh.write(struct.pack("<q", len(message)))
    fh.write(message)


def detector_config(n_frames: int, frame_shape: tuple[int, int], dtype: np.dtype, encoding: str,
                    frame_time_s: float = 1e-3, trigger_mode: str = "exte") -> dict:
    """The detector configuration message (``header_detail`` basic plus what the REST API reads)."""
    return {
        "ntrigger": int(n_frames), "nimages": 1, "trigger_mode": trigger_mode,
        "x_pixels_in_detector": int(frame_shape[1]), "y_pixels_in_detector": int(frame_shape[0]),
        "bit_depth_image": int(np.dtype(dtype).itemsize * 8), "count_time": frame_time_s,
        "frame_time": frame_time_s, "compression": encoding,
    }


def write_dump(frames: Iterable[np.ndarray], n_frames: int, frame_shape: tuple[int, int], dtype,
               path: str | Path, encoding: str = "bslz4", series: int = 1, frame_time_s: float = 1e-3,
               progress: bool = False) -> Path:
    """Write a SIMPLON stream dump of ``n_frames`` frames (atomic: a partial file never has the final name)."""
    from tqdm import tqdm

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    dtype = detector_dtype(dtype)
    bits = dtype.itemsize * 8
    enc_name = f"bs{bits}-lz4<" if encoding == "bslz4" else "lz4<"
    compress = BitshuffleLZ4(frame_shape, dtype) if encoding == "bslz4" else lz4_block
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    written = 0
    with open(tmp, "wb") as fh:
        _record(fh, {"htype": "dheader-1.0", "series": series, "header_detail": "basic"})
        _record(fh, detector_config(n_frames, frame_shape, dtype, encoding, frame_time_s))
        for i, frame in enumerate(tqdm(frames, total=n_frames, unit="frame", disable=not progress,
                                       desc="encoding")):
            frame = to_detector_frames(np.asarray(frame), dtype)
            if frame.shape != tuple(frame_shape):
                raise ValueError(f"frame {i} has shape {frame.shape}, expected {tuple(frame_shape)}")
            payload = compress(frame)
            _record(fh, {"htype": "dimage-1.0", "series": series, "frame": i,
                         "hash": hashlib.md5(payload).hexdigest()})
            _record(fh, {"htype": "dimage_d-1.0", "shape": [int(frame_shape[1]), int(frame_shape[0])],
                         "type": DTYPES[dtype], "encoding": enc_name})
            _record(fh, payload)
            t = int(i * frame_time_s * 1e9)
            _record(fh, {"htype": "dconfig-1.0", "start_time": t, "stop_time": t + int(frame_time_s * 1e9),
                         "real_time": int(frame_time_s * 1e9)})
            written += 1
        if written != n_frames:
            raise ValueError(f"{written} frames given, {n_frames} announced")
        _record(fh, {"htype": "dseries_end-1.0", "series": series})
    tmp.replace(path)
    return path


def iter_frames(data: np.ndarray, chunk: int = 1024) -> Iterator[np.ndarray]:
    """Frames of an (..., H, W) array (e.g. a memory map) in raster order, read in chunks."""
    flat = data.reshape(-1, *data.shape[-2:])
    for lo in range(0, len(flat), chunk):
        yield from np.asarray(flat[lo:lo + chunk])
