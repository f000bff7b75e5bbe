"""Atomic outputs: build into a temporary sibling, rename into place on success, remove it on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `dst`; it becomes `dst` only if the block finishes without error.

    `dst` may end up a file or a directory, whatever the block writes at the yielded path. An existing
    `dst` is an error unless `overwrite` (then it is replaced only after the new output is complete).
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it.")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    tmp = os.path.join(scratch, "out")
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise RuntimeError(f"nothing was written for {dst}")
        if os.path.exists(dst):
            old = os.path.join(scratch, "old")
            os.replace(dst, old)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
