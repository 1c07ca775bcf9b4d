"""Output folders: refuse to clobber, write atomically (temp folder, then rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an existing output folder (unless ``overwrite``) or one that is an input."""
    out = Path(out).expanduser().resolve()
    for given in inputs:
        if given and Path(given).expanduser().exists() and \
                Path(given).expanduser().resolve() in (out, *out.parents):
            raise ValueError(f"output folder {out} would overwrite the input {given}; "
                             "choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists; pass --overwrite to "
                              "replace it or choose another --out")
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; move it into place only on success.

    An exception (or Ctrl-C) removes the temporary folder and leaves ``out`` untouched.
    """
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"output folder {out} appeared while writing; "
                                      "pass --overwrite to replace it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
