"""Pattern and image files as numpy stacks: .npy, TIFF (single or stack), .dm3/.dm4.

Every reader returns an (N, H, W) array in the file's own dtype and intensity units, or raises a
ValueError that names the file and the problem.  DigitalMicrograph files go through
RosettaSciIO, TIFF through tifffile; .npy is read without pickle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".tif", ".tiff", ".dm3", ".dm4")


NPY_MAGIC = b"\x93NUMPY"


def _as_stack(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind == "c":
        raise ValueError(f"{path}: data of type {arr.dtype} is complex; give real intensities "
                         "(integer or float pixels), e.g. the modulus squared")
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


def _check_npy_header(path: Path) -> None:
    """Name what the file is when it is not a .npy file at all: NumPy's own errors for an empty or
    a text file ("No data left", "pickled data") point the user the wrong way."""
    with open(path, "rb") as fh:
        head = fh.read(len(NPY_MAGIC))
    if not head:
        raise ValueError(f"{path}: the file is empty (0 bytes), not a .npy file")
    if head != NPY_MAGIC:
        raise ValueError(f"{path}: not a .npy file (no NumPy header; it starts with {head!r})")


def read_npy(path: Path) -> np.ndarray:
    _check_npy_header(path)
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ValueError(f"{path}: the .npy file holds Python objects, not numbers; stemlive reads only "
                             "numeric arrays (it never unpickles)") from None
        if "mmap length" in str(exc) or "EOF" in str(exc):
            raise ValueError(f"{path}: the .npy file is truncated (shorter than its header says)") from None
        raise ValueError(f"{path}: not a plain numeric .npy file ({exc})") from None
    except EOFError:
        raise ValueError(f"{path}: the .npy file is truncated (its data ends early)") from None
    return np.asarray(arr)


def read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes if tif.series else ""
            shape = tif.series[0].shape if tif.series else ()
            arr = None if "S" in axes else tif.asarray()
    except (tifffile.TiffFileError, ValueError, EOFError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable TIFF file ({exc})") from None
    if arr is None:  # samples per pixel: an RGB(A) picture, not detector data
        raise ValueError(f"{path}: a colour (RGB) image, axes {axes} {shape}; give the detector's greyscale data")
    return arr


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
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file ({', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    readers = {".npy": read_npy, ".tif": read_tiff, ".tiff": read_tiff, ".dm3": read_dm, ".dm4": read_dm}
    if suffix not in readers:
        raise ValueError(f"{path}: unknown file type {suffix!r}; readable: {', '.join(SUFFIXES)}")
    return _as_stack(readers[suffix](path), path)
