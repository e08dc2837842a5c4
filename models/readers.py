"""Pattern and image files as numpy stacks: .npy, TIFF (single or stack), .dm3/.dm4, PNG, JPEG.

Every reader returns an (N, H, W) array in the file's own dtype and intensity units, or raises a
ValueError that names the file and the problem.  DigitalMicrograph files go through
RosettaSciIO, TIFF through tifffile, PNG and JPEG through Pillow; .npy is read without pickle.

PNG/JPEG exports are greyscale data, 8- or 16-bit (or 32-bit integer/float), read as stored.
A colour file is accepted only when it *is* grey: red, green and blue equal to within
``GREY_TOLERANCE`` of the full scale (JPEG's rounding), and then read as their mean.  A
false-colour picture (a colour map) cannot be turned back into intensities, so it is refused,
as a colour TIFF is.  An alpha channel that is opaque everywhere is ignored; transparency is
refused (a transparent pixel holds no measurement), and so are 1-bit and animated images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".tif", ".tiff", ".dm3", ".dm4", ".png", ".jpg", ".jpeg")
GREY_TOLERANCE = 0.02  # of full scale: JPEG's colour rounding on a grey picture stays well inside


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


def read_image(path: Path) -> np.ndarray:
    """A PNG or JPEG (Pillow) as one greyscale pattern (rules in the module docstring)."""
    from PIL import Image

    kind = path.suffix.lstrip(".").upper()
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes), not a {kind} image")
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ValueError(f"{path}: an animated image ({im.n_frames} frames); give one pattern per "
                                 "PNG/JPEG, or a TIFF stack")
            im.load()
            if im.mode == "1":
                raise ValueError(f"{path}: a 1-bit (black and white) image holds no intensities; export the "
                                 "greyscale data (8- or 16-bit)")
            if im.mode == "P":  # a palette: its colours say what each index means
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not im.mode.startswith("I;16"):
                im = im.convert("RGB")  # CMYK, YCbCr, ...: judged by the grey rule below
            arr = np.asarray(im)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable {kind} image ({exc})") from None
    return _grey(arr, path) if arr.ndim == 3 else arr


def _grey(arr: np.ndarray, path: Path) -> np.ndarray:
    """The grey values of an (H, W, channels) picture, or a ValueError when it is not grey."""
    full = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
    colour, alpha = (arr[..., :-1], arr[..., -1]) if arr.shape[-1] in (2, 4) else (arr, None)
    if alpha is not None and np.any(alpha < full):
        raise ValueError(f"{path}: the image has transparent pixels (alpha below full scale at "
                         f"{int((alpha < full).sum())} pixels), which hold no measurement; export it without transparency")
    if colour.shape[-1] == 1:
        return colour[..., 0]
    c = colour.astype(np.float64)
    spread = float((c.max(axis=-1) - c.min(axis=-1)).max())
    if spread > GREY_TOLERANCE * full:
        raise ValueError(f"{path}: a colour image (red, green and blue differ by up to {spread:g} of {full:g}); "
                         "colours cannot be turned back into intensities: export the greyscale data")
    mean = c.mean(axis=-1)
    return np.round(mean).astype(arr.dtype) if arr.dtype.kind in "ui" else mean.astype(arr.dtype)


def read_patterns(path: str | Path) -> np.ndarray:
    """(N, H, W) patterns from a file, in input order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file ({', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    readers = {".npy": read_npy, ".tif": read_tiff, ".tiff": read_tiff, ".dm3": read_dm, ".dm4": read_dm,
               ".png": read_image, ".jpg": read_image, ".jpeg": read_image}
    if suffix not in readers:
        raise ValueError(f"{path}: unknown file type {suffix!r}; readable: {', '.join(SUFFIXES)}")
    return _as_stack(readers[suffix](path), path)
