"""Object-store paths (gs://...): which client writes them, the checks before a job starts, and the local staging
of files an object store cannot append to (docs/tpu.md, "How gs:// is handled").

Clients. Our own reads and writes, Orbax's metadata and TFDS's go through etils `epath`; for gs:// it picks
TensorFlow's GCS filesystem when TF is importable, else gcsfs (fsspec). TF's filesystem talks to a built-in
endpoint (https://www.googleapis.com/storage/v1/) that no setting changes, so nothing that goes through it can be
tested against a local Cloud Storage server; gcsfs honours `STORAGE_EMULATOR_HOST`. The package therefore sets
`EPATH_USE_TF=false` (unless the user set it; `eqvae_jax/__init__.py`, before anything resolves a path), and
every epath gs:// access in the process, ours and the libraries', uses gcsfs with the machine's default
credentials (on a TPU VM its service account). Orbax's arrays go through TensorStore (`TENSORSTORE_GCS_HTTP_URL`
points it elsewhere), ArrayRecord reads gs:// itself (`CLOUD_STORAGE_EMULATOR_ENDPOINT`) but writes local files
only. TensorBoard's event files (written without TensorFlow, `train/event_file.py`) and metrics.jsonl are
appended to, which an object cannot be: they are written in a local staging directory and copied up
(`StagedDir`).

Atomicity. An object appears whole or not at all when its upload completes, so a single-file write is atomic by
itself (`write_atomic` for bytes, `atomic_file` for what a library writes to a file name, e.g. np.savez; a local
file goes through a temporary name and a rename instead). There is no atomic rename of a directory: multi-file
outputs are built locally and uploaded by `publish_tree` with their commit markers last: every top-level `.json`
file (what each reader opens first: a weights directory's or a diffusers directory's config.json, a TFDS
version's dataset_info.json/features.json) and, in an Orbax directory, `commit_success.txt` (what Orbax itself
writes last on GCS, and requires before it restores). A failed upload deletes what it wrote. Orbax checkpoints,
eval_vae's shards (arrays, then the JSON marker) and latent-cache chunks (one object each) are committed the same
way. Readers of local files only (the torch/safetensors loaders of `convert`, eval_samples' npz) get a
`local_copy`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator

from etils import epath

log = logging.getLogger(__name__)


ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")  # files that make a directory an Orbax checkpoint
ORBAX_COMMIT_FILE = "commit_success.txt"  # Orbax's marker of a finished checkpoint on GCS (atomicity.py)
SIBLING_CONFIGS = (".yaml", ".yml", ".json")  # what `local_copy` of a file brings along (taming's config.yaml)


def is_url(path: str | os.PathLike) -> bool:
    """True for an object-store path such as gs://bucket/dir (False for a local path)."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path, or a URL (gs://...) unchanged (os.path.abspath would turn it into ./gs:/...)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def _fs(url: str):
    """(fsspec file system, path within it) of an object-store URL: gcsfs for gs:// (STORAGE_EMULATOR_HOST
    points it at a local server)."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def upload(local: str, url: str) -> None:
    """The local file `local` as the object `url`, whole or absent: one request for a small file, a resumable
    upload finalised only after its last chunk for a large one (fsspec's open('wb') would commit a truncated
    object when interrupted)."""
    fs, path = _fs(url)
    fs.put_file(local, path)


def download(url: str, local: str) -> None:
    """The object `url` into the local file `local`."""
    fs, path = _fs(url)
    fs.get_file(path, local)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of `data`: one object upload on an
    object store, a temporary name and a rename on a local disk (unique per process, so concurrent writers of
    the same file on a shared disk do not mix)."""
    path = os.fspath(path)
    if is_url(path):
        fs, remote = _fs(path)
        fs.pipe_file(remote, data)  # one request
        return
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A local temporary file name for the block to write; it becomes `path` (local or gs://) when the block
    succeeds: a rename on a local disk, a streamed upload of one object on an object store (whole or absent
    either way). `suffix` ends the temporary name (np.savez appends ".npz" to a name without it)."""
    path = os.fspath(path)
    if is_url(path):
        with tempfile.TemporaryDirectory(prefix="eqvae_upload_") as scratch:
            tmp = os.path.join(scratch, f"out{suffix}")
            yield tmp
            upload(tmp, path)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def upload_order(src: str) -> list[str]:
    """The files under the local directory `src` (relative paths) in the order `publish_tree` uploads them:
    data first, then each Orbax directory's commit marker, then the top-level .json files."""
    files, markers = [], []
    for root, _, names in os.walk(src):
        rel_root = os.path.relpath(root, src)
        if any(m in names for m in ORBAX_MARKERS) or ORBAX_COMMIT_FILE in names:
            markers.append(os.path.normpath(os.path.join(rel_root, ORBAX_COMMIT_FILE)))
        files += [os.path.normpath(os.path.join(rel_root, n)) for n in names if n != ORBAX_COMMIT_FILE]
    last = sorted(f for f in files if os.sep not in f and f.endswith(".json"))
    first = sorted(f for f in files if f not in last)
    return first + sorted(markers) + last


def publish_tree(src: str, dst: str, overwrite: bool = False) -> None:
    """Upload the local file or directory `src` to the object-store path `dst`, commit markers last
    (`upload_order`); an Orbax directory gets the `commit_success.txt` Orbax would have written. An existing
    `dst` is an error unless `overwrite` (then it is deleted first: an object store has no atomic replace). A
    failed upload deletes the objects it wrote, and raises."""
    target = epath.Path(dst)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it.")
    if os.path.isfile(src):
        upload(src, dst)  # one object replaces another whole: nothing to delete first
        return
    if target.exists():
        target.rmtree()
    written: list[epath.Path] = []
    try:
        for rel in upload_order(src):
            out = target / rel
            written.append(out)  # before the upload: an interrupted one may still have left an object
            local = os.path.join(src, rel)
            if os.path.exists(local) or os.path.islink(local):
                upload(local, os.fspath(out))
            else:  # the Orbax commit marker
                write_atomic(out, f"Checkpoint commit was successful to {out.parent}".encode())
    except BaseException:
        for out in reversed(written):
            try:
                out.unlink(missing_ok=True)
            except Exception:  # noqa: BLE001 - best effort: the original error is what the caller needs
                log.warning("could not delete %s after a failed upload", out)
        raise


def remote_problem(url: str, flag: str = "--workdir") -> str | None:
    """Why `url` (gs://BUCKET/...) cannot be written: its bucket missing or not writable, found by writing and
    deleting a probe object (None: it can). Call before any model is built."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        return f"{flag}={url} names no bucket"
    probe = f"{url.rstrip('/')}/.eqvae_write_probe_{uuid.uuid4().hex[:8]}"
    try:
        write_atomic(probe, b"")
        epath.Path(probe).unlink()
    except Exception as e:  # noqa: BLE001 - gcsfs/aiohttp/google-auth raise many kinds; each means "cannot write"
        try:
            missing = not epath.Path(f"{url.split('://', 1)[0]}://{bucket}").exists()
        except Exception:  # noqa: BLE001 - not allowed to look at the bucket either: report the write's error
            missing = False
        if missing:
            return f"{flag}={url}: bucket '{bucket}' does not exist (or these credentials cannot see it)"
        return f"{flag}={url} is not writable: {_first_line(e)}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def local_copy(src: str) -> Iterator[str]:
    """`src` itself when local; for gs://..., a temporary local copy of the file or directory (same base name;
    a file comes with its small sibling config files, `SIBLING_CONFIGS`, which some formats read beside the
    weights), removed afterwards: for readers of local files only (the loaders in `convert`, npz readers)."""
    if not is_url(src):
        yield src
        return
    remote = epath.Path(src)
    if not remote.exists():
        raise FileNotFoundError(f"{src} does not exist")
    with tempfile.TemporaryDirectory(prefix="eqvae_download_") as scratch:
        local = os.path.join(scratch, remote.name)
        if remote.is_file():
            pairs = [(remote, local)] + [(p, os.path.join(scratch, p.name)) for p in remote.parent.iterdir()
                                         if p.suffix in SIBLING_CONFIGS and p != remote and p.is_file()]
        else:
            pairs = [(p, os.path.join(local, os.fspath(p.relative_to(remote)))) for p in _files_under(remote)]
        for path, target in pairs:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            download(os.fspath(path), target)
        yield local


def _files_under(root: epath.Path) -> list[epath.Path]:
    """Every file under the epath directory `root` (epath refuses `**` globs on gs://, so one listing per level)."""
    files = []
    for child in root.iterdir():
        files += _files_under(child) if child.is_dir() else [child]
    return files


class StagedDir:
    """A local directory mirrored to `remote` (gs://...): files are written locally, `sync` uploads the ones that
    changed since the last upload (whole objects, as an object store can only replace), `close` syncs a last
    time and removes the local copy. For writers that append (TensorBoard's event files, metrics.jsonl).
    `pull` first copies existing remote files down, so a resumed run appends to what the last one wrote."""

    def __init__(self, remote: str, pull: tuple[str, ...] = ()):
        self.remote = epath.Path(remote)
        self.local = tempfile.mkdtemp(prefix="eqvae_staged_")
        self._uploaded: dict[str, tuple[int, int]] = {}
        for name in pull:
            source = self.remote / name
            if source.exists():
                target = os.path.join(self.local, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                download(os.fspath(source), target)
                self._uploaded[name] = self._signature(target)
        self.last_sync = time.monotonic()

    @staticmethod
    def _signature(path: str) -> tuple[int, int]:
        s = os.stat(path)
        return s.st_size, s.st_mtime_ns

    def sync(self) -> int:
        """Upload every file that changed; returns how many were uploaded."""
        uploaded = 0
        for root, _, files in os.walk(self.local):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, self.local)
                signature = self._signature(path)
                if self._uploaded.get(rel) == signature:
                    continue
                upload(path, os.fspath(self.remote / rel))
                self._uploaded[rel] = signature
                uploaded += 1
        self.last_sync = time.monotonic()
        return uploaded

    def close(self) -> None:
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
