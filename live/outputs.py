"""One rule for every file stemlive writes (DESIGN.md, "Files and processes").

* An output never overwrites an input or a recording: the same file under another name (a
  link, ``./x`` vs ``x``) is caught too.
* An existing output is replaced only when asked (``--overwrite``), and then the new file is
  written beside it and renamed over it only when the work succeeded, so a failed run leaves
  the earlier file exactly as it was.
* A temporary file never survives a refusal or a failure.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name the same file (following links), existing or not."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(out: str | Path, inputs: Iterable[str | Path | None] = (), *, overwrite: bool = False,
                 what: str = "--out") -> Path:
    """Refuse an output that is an input, a directory, or an existing file without ``overwrite``.

    Called before any work, so a refusal costs nothing and writes nothing.
    """
    out = Path(out)
    for src in inputs:
        if src is not None and same_file(out, src):
            raise ValueError(f"{what} {out} is the input {src}: stemlive never writes over its input; "
                             "choose another output path")
    if out.is_dir():
        raise ValueError(f"{what} {out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{what} {out} exists; choose another path or give --overwrite to replace it "
                              "(it is replaced only when the run succeeds)")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"{what} {out}: {out.parent} is not a directory")
    return out


def beside(out: str | Path, tag: str) -> Path:
    """A sibling of ``out`` that keeps its suffix (``r.h5`` -> ``r.<tag>.h5``): readable by the same tools."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{tag}{out.suffix}")


@contextlib.contextmanager
def replacing(out: str | Path, tag: str = "partial") -> Iterator[Path]:
    """Write ``out`` through a file beside it, renamed over ``out`` only when the block succeeds;
    on any failure the partial file is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{tag}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
