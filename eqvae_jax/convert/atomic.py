"""Atomic outputs: build into a temporary sibling, rename into place on success, remove it on failure.

Several processes may write the same output at once (e.g. `convert` run on every worker of a slice with a
shared destination). Each builds in its own temporary directory; the first rename wins. A later one finds the
destination taken: without `overwrite` that is a FileExistsError saying so (the winner's output is kept as it
is); with `overwrite` the later output replaces it, as if the processes had run one after the other.

An object-store destination (gs://...) is built in a local temporary directory and uploaded only when the
conversion succeeded, commit markers last (`storage.publish_tree`): a failed conversion writes no object, and a
failed upload deletes what it wrote.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator

from eqvae_jax import storage

# what rename() raises when its target is a non-empty directory (Linux: ENOTEMPTY; some systems: EEXIST)
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `dst`; it becomes `dst` only if the block finishes without error.

    `dst` may end up a file or a directory, whatever the block writes at the yielded path. An existing
    `dst` is an error unless `overwrite` (then it is replaced only after the new output is complete).
    """
    if storage.is_url(dst):
        with _via_local_copy(os.fspath(dst), overwrite) as tmp:
            yield tmp
        return
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
        _normal_permissions(tmp)
        _publish(tmp, dst, overwrite, os.path.join(scratch, "old"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _via_local_copy(dst: str, overwrite: bool) -> Iterator[str]:
    """`atomic_path` for an object-store `dst`: a local temporary path, uploaded by `storage.publish_tree` (commit
    markers last) only when the block succeeded."""
    from etils import epath

    if not overwrite and epath.Path(dst).exists():
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it.")
    with tempfile.TemporaryDirectory(prefix="eqvae_convert_") as scratch:
        tmp = os.path.join(scratch, "out")
        yield tmp
        if not os.path.exists(tmp):
            raise RuntimeError(f"nothing was written for {dst}")
        storage.publish_tree(tmp, dst, overwrite)


def _normal_permissions(path: str) -> None:
    """What a plain open()/mkdir gives under the umask (e.g. 0644 / 0755), for every file and directory under
    `path`: some writers (safetensors) create 0600 files, which other users of a shared disk could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [path])]:
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~mask)


def _publish(tmp: str, dst: str, overwrite: bool, old: str) -> None:
    """Rename `tmp` to `dst`; an existing `dst` is moved to `old` first (overwrite) or is an error."""
    if overwrite and os.path.lexists(dst):
        with contextlib.suppress(FileNotFoundError):  # another process may have moved it away meanwhile
            os.replace(dst, old)
    if not overwrite and os.path.lexists(dst):  # a file rename would replace it silently
        raise _taken(dst)
    try:
        os.replace(tmp, dst)
    except OSError as e:
        if e.errno not in _TAKEN:
            raise
        if not overwrite:
            raise _taken(dst) from None
        shutil.rmtree(dst, ignore_errors=True)  # another overwriting process renamed its copy in between
        os.replace(tmp, dst)


def _taken(dst: str) -> FileExistsError:
    return FileExistsError(f"{dst} was written by another process while this one worked; it was left as it "
                           "is (pass --overwrite to replace it).")
