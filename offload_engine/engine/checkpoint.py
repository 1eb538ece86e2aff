"""Checkpoint files on disk: atomic writes and validated reads.

A checkpoint is a directory ``<save_dir>/<tag>/`` holding one torch file per part (model,
engine, and one optimizer file per data-parallel rank) and ``manifest.json``: the format
version, per file its size and SHA-256, and the optimizer files' layout (reshard.py).
``<save_dir>/latest`` names the newest tag. write_checkpoint saves from one process;
begin_save / write_part / commit_save let several processes write one checkpoint.

[Note: atomic checkpoints] A save writes every file into a hidden temporary directory, fsyncs
each file and the directory, renames the directory to its tag, fsyncs ``save_dir``, and only
then replaces ``latest`` (write a temporary file, fsync, rename). A process killed at any
point therefore leaves ``latest`` naming a complete checkpoint: the new one or the previous
one. A read checks the manifest (version, every file present with its recorded size and hash)
before unpickling anything, so a truncated or corrupt checkpoint is refused by name.

Saving over an existing tag moves the old directory aside (``.<tag>.old-*``) before the new
one takes its name; should the process die between the two renames, a read of that tag
finds the old copy. Files are hashed while they are written and verified by streaming, and
loaded memory-mapped, so neither side holds a second copy of the state in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_TMP = re.compile(r"^\.(?P<tag>.+)\.(tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG.match(tag) or tag == LATEST:
        raise ValueError(f"checkpoint tag must be 1-200 characters of letters, digits, '.', '_', '+', '-' "
                         f"(not starting with a symbol, and not {LATEST!r}); got {tag!r}")
    return tag


def _fsync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _scratch_name(tag: str, kind: str) -> str:
    # Host and pid in the name: only a save of this host whose process is gone is cleaned up
    # (another host or container may be saving into a shared directory right now).
    return f".{tag}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _remove_stale_temporaries(save_dir: Path) -> None:
    """Scratch entries of this host's saves whose process died are deleted: temporaries of a
    save killed mid-way, and old copies of a tag whose replacement is in place."""
    import psutil

    for entry in save_dir.iterdir():
        m = _TMP.match(entry.name)
        if not m or m["host"] != _host() or psutil.pid_exists(int(m["pid"])):
            continue
        kind = m.group(2)
        if kind == "tmp" or (save_dir / m["tag"]).is_dir():  # an old copy is kept while its tag is missing
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


class _HashingWriter:
    """A file torch.save streams into, hashing and counting what goes through."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.nbytes += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_checkpoint(save_dir, tag: str, parts: dict, *, save_latest: bool = True, extra: dict | None = None) -> Path:
    """Writes {file name: object} as checkpoint `tag` under `save_dir` ([Note: atomic
    checkpoints]); `extra` adds keys to the manifest. Returns the checkpoint's directory."""
    tmp = begin_save(save_dir, tag)
    try:
        files = {name: write_part(tmp, name, obj) for name, obj in parts.items()}
    except BaseException:
        abort_save(tmp)
        raise
    return commit_save(save_dir, tag, tmp, files, save_latest=save_latest, extra=extra)


# A save in steps, for several writers (data-parallel ranks): one process begins it, every
# writer adds its files to the temporary directory, and the one process commits the manifest
# of all of them (or aborts) once every writer has finished ([Note: saving from several ranks]
# in checkpointer.py).
def begin_save(save_dir, tag: str) -> Path:
    """Checks `tag`, creates `save_dir` if needed, removes this host's dead temporaries and
    returns a fresh temporary directory for the checkpoint's files."""
    save_dir = Path(save_dir)
    check_tag(tag)
    if not save_dir.is_dir():
        save_dir.mkdir(parents=True, exist_ok=True)
        _fsync_dir(save_dir.parent)  # the new directory's entry is durable too
    _remove_stale_temporaries(save_dir)
    tmp = save_dir / _scratch_name(tag, "tmp")
    tmp.mkdir()
    return tmp


def write_part(tmp: Path, name: str, obj) -> dict:
    """torch.save(obj) to `tmp/name`, fsynced; returns its manifest entry (size and SHA-256)."""
    with open(Path(tmp) / name, "wb") as f:
        out = _HashingWriter(f)
        torch.save(obj, out)
        _fsync_file(f)
    return {"bytes": out.nbytes, "sha256": out.sha.hexdigest()}


def abort_save(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def commit_save(save_dir, tag: str, tmp: Path, files: dict, *, save_latest: bool = True,
                extra: dict | None = None) -> Path:
    """Writes the manifest of `files` ({name: entry}) into `tmp`, renames `tmp` to the tag and
    then points ``latest`` at it. On failure `tmp` is removed and the tag keeps its previous
    checkpoint."""
    save_dir = Path(save_dir)
    final, old = save_dir / tag, None
    try:
        manifest = {"format": "offload_engine checkpoint", "version": CHECKPOINT_VERSION, "tag": tag,
                    "files": dict(files), **(extra or {})}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            _fsync_file(f)
        _fsync_dir(tmp)  # every writer's file entries, and the manifest's
        if final.exists():  # replacing a tag: move the old one aside first (a directory cannot be renamed over)
            old = save_dir / _scratch_name(tag, "old")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(save_dir)
    except BaseException:
        abort_save(tmp)
        if old is not None and not final.exists():
            os.rename(old, final)  # the save failed: the tag keeps its previous checkpoint
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if save_latest:
        latest_tmp = save_dir / _scratch_name(LATEST, "tmp")
        with open(latest_tmp, "w", encoding="utf-8") as f:
            f.write(tag)
            _fsync_file(f)
        os.replace(latest_tmp, save_dir / LATEST)
        _fsync_dir(save_dir)
    return final


def resolve_tag(load_dir, tag=None) -> Path:
    """The directory of checkpoint `tag` (default: the one ``latest`` names)."""
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / LATEST
        try:
            tag = latest.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise CheckpointError(f"{latest}: no such file; pass tag= to choose a checkpoint in {load_dir}") from None
    path = load_dir / check_tag(tag)
    if not path.is_dir():
        # A save replacing this tag died between moving the old copy aside and renaming the
        # new one in: the old copy is complete.
        olds = sorted(load_dir.glob(f".{tag}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds and (olds[-1] / MANIFEST).is_file():
            return olds[-1]
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return path


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint directory `path`, checked for its version and files table."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing (an incomplete checkpoint?)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: not a valid manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: not a valid manifest (no 'files' table)")
    version = manifest.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{manifest_path}: checkpoint format version {version!r} is not supported (this "
                              f"version reads {CHECKPOINT_VERSION})")
    return manifest


def read_checkpoint(path: Path, names, *, pickled=(), manifest: dict | None = None) -> dict:
    """{file name: object} for `names` in checkpoint directory `path`, each file checked
    against the manifest first. Files are read with torch.load(weights_only=True) (tensors
    and plain containers only), except those in `pickled` (arbitrary client state)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if manifest is None:
        manifest = read_manifest(path)
    out = {}
    for name in names:
        entry, file = manifest["files"].get(name), path / name
        if not isinstance(entry, dict) or "bytes" not in entry or "sha256" not in entry:
            raise CheckpointError(f"{manifest_path}: no entry for {name}")
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing") from None
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest records {entry['bytes']} (truncated?)")
        sha = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
        if sha.hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{file}: contents do not match the manifest's SHA-256 (corrupt)")
        try:
            out[name] = torch.load(file, map_location="cpu", mmap=True, weights_only=name not in pickled)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err})") from None
    return out
