"""Pattern and image files as numpy stacks: .npy, TIFF (single or stack), .dm3/.dm4.

Every reader returns an (N, H, W) array in the file's own dtype and intensity units, or raises a
ValueError that names the file and the problem.  DigitalMicrograph files go through
RosettaSciIO, TIFF through tifffile; .npy is read without pickle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".tif", ".tiff", ".dm3", ".dm4")


def _as_stack(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{path}: data of type {arr.dtype} is not numeric (need integer or float pixels)")
    if arr.size == 0:
        raise ValueError(f"{path}: the file holds no data (shape {arr.shape})")
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    raise ValueError(f"{path}: expected one pattern (H×W) or a stack (N×H×W), got {arr.ndim} dimensions "
                     f"{arr.shape}; a 4D-STEM scan is analysed with `stemlive replay`")


def read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        raise ValueError(f"{path}: not a plain numeric .npy file ({exc})") from None
    return np.asarray(arr)


def read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        return tifffile.imread(path)
    except (tifffile.TiffFileError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable TIFF file ({exc})") from None


def read_dm(path: Path) -> np.ndarray:
    from rsciio.digitalmicrograph import file_reader

    try:
        found = file_reader(str(path), lazy=False)
    except Exception as exc:  # the reader raises many kinds on a damaged file
        raise ValueError(f"{path}: not a readable DigitalMicrograph file ({type(exc).__name__}: {exc})") from None
    images = [d["data"] for d in found if np.asarray(d["data"]).ndim >= 2]
    if not images:
        raise ValueError(f"{path}: the DigitalMicrograph file holds no image")
    return np.asarray(images[0])


def read_patterns(path: str | Path) -> np.ndarray:
    """(N, H, W) patterns from a file, in input order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    readers = {".npy": read_npy, ".tif": read_tiff, ".tiff": read_tiff, ".dm3": read_dm, ".dm4": read_dm}
    if suffix not in readers:
        raise ValueError(f"{path}: unknown file type {suffix!r}; readable: {', '.join(SUFFIXES)}")
    return _as_stack(readers[suffix](path), path)
