"""Writers of detector file formats for the tests: Quantum Detectors MIB (+ .hdr) and DECTRIS
master/data HDF5 files (bitshuffle-LZ4 chunks, data linked from the master file)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def mib_frame_header(seq: int, shape: tuple[int, int], bits: int = 12) -> bytes:
    """A Merlin 1×1 single-chip frame header (384 bytes), as LiberTEM's MIB reader parses it."""
    h, w = shape
    fields = ["MQ1", f"{seq:06d}", "00384", "01", f"{w:04d}", f"{h:04d}", "U16", "   1x1", "01",
              "2026-12-02 04:00:00.000000", "0.001000", "0", "0", "0",
              "1.200000E+2", "5.110000E+2", *["0.000000E+0"] * 6, "3RX",
              *["175", "511", "000", "000", "000", "000", "000", "000", "125", "255", "125", "125", "100", "100",
                "082", "100", "087", "030", "128", "004", "255", "129", "128", "176", "168", "511", "511"],
              "MQ1A", "2026-12-02T04:00:00.000000000Z", "1000000ns", str(bits), ""]
    head = ",".join(fields).encode("ascii")
    assert len(head) <= 384
    return head + b"\x00" * (384 - len(head))


def write_mib(frames: np.ndarray, path: Path, bits: int = 12) -> Path:
    """(H, W, h, w) frames -> PATH.mib and PATH.hdr; returns the .hdr path."""
    path = Path(path)
    sy, sx, h, w = frames.shape
    with open(path.with_suffix(".mib"), "wb") as fh:
        for i, frame in enumerate(frames.reshape(-1, h, w)):
            fh.write(mib_frame_header(i + 1, (h, w), bits))
            fh.write(np.asarray(frame, ">u2").tobytes())
    hdr = path.with_suffix(".hdr")
    hdr.write_text(f"HDR,\nFrames in Acquisition (Number):\t{sy * sx}\nFrames per Trigger (Number):\t{sx}\n"
                   f"Counter Depth (number):\t{bits}\nEnd\t")
    return hdr


def write_dectris_master(frames: np.ndarray, directory: Path, prefix: str = "scan") -> Path:
    """DECTRIS-style files: PREFIX_data_000001.h5 (bslz4 chunks, one frame each) and
    PREFIX_master.h5 linking /entry/data/data_000001 to it; returns the master path."""
    import h5py
    import hdf5plugin

    directory = Path(directory)
    n = int(np.prod(frames.shape[:-2]))
    flat = frames.reshape(n, *frames.shape[-2:]).astype(np.uint16)
    data = directory / f"{prefix}_data_000001.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("entry/data/data", data=flat, chunks=(1, *flat.shape[1:]),
                         **hdf5plugin.Bitshuffle(cname="lz4"))
    master = directory / f"{prefix}_master.h5"
    with h5py.File(master, "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink(data.name, "entry/data/data")
        det = f.create_group("entry/instrument/detector")
        det["x_pixels_in_detector"] = flat.shape[2]
        det["y_pixels_in_detector"] = flat.shape[1]
        det["bit_depth_image"] = 16
    return master
