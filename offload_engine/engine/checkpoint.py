"""Checkpoint files on disk: atomic writes and validated reads.

A checkpoint is a directory ``<save_dir>/<tag>/`` holding one torch file per part (model,
optimizer, engine) and ``manifest.json``: the format version and, per file, its size and
SHA-256. ``<save_dir>/latest`` names the newest tag.

[Note: atomic checkpoints] A save writes every file into a hidden temporary directory, fsyncs
each file and the directory, renames the directory to its tag, fsyncs ``save_dir``, and only
then replaces ``latest`` (write a temporary file, fsync, rename). A process killed at any
point therefore leaves ``latest`` naming a complete checkpoint: the new one or the previous
one. A read checks the manifest (version, every file present with its recorded size and hash)
before unpickling anything, so a truncated or corrupt checkpoint is refused by name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_TMP = re.compile(r"^\.(?P<tag>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


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


def _remove_stale_temporaries(save_dir: Path) -> None:
    """Temporary directories of saves whose process died (killed mid-save) are deleted."""
    import psutil

    for entry in save_dir.iterdir():
        m = _TMP.match(entry.name)
        if m and entry.is_dir() and not psutil.pid_exists(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def write_checkpoint(save_dir, tag: str, parts: dict, *, save_latest: bool = True) -> Path:
    """Writes {file name: object} as checkpoint `tag` under `save_dir` ([Note: atomic
    checkpoints]); returns the checkpoint's directory."""
    save_dir = Path(save_dir)
    check_tag(tag)
    save_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(save_dir)
    tmp = save_dir / f".{tag}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        manifest = {"format": "offload_engine checkpoint", "version": CHECKPOINT_VERSION, "tag": tag, "files": {}}
        for name, obj in parts.items():
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getbuffer()
            with open(tmp / name, "wb") as f:
                f.write(data)
                _fsync_file(f)
            manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            _fsync_file(f)
        _fsync_dir(tmp)
        final = save_dir / tag
        old = None
        if final.exists():  # replacing a tag: move the old one aside first (a directory cannot be renamed over)
            old = save_dir / f".{tag}.old-{uuid.uuid4().hex[:12]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if save_latest:
        latest_tmp = save_dir / f".{LATEST}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
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
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return path


def read_checkpoint(path: Path, names, *, pickled=()) -> dict:
    """{file name: object} for `names` in checkpoint directory `path`, each file checked
    against the manifest first. Files are read with torch.load(weights_only=True) (tensors
    and plain containers only), except those in `pickled` (arbitrary client state)."""
    manifest_path = path / MANIFEST
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
    out = {}
    for name in names:
        entry, file = manifest["files"].get(name), path / name
        if not isinstance(entry, dict) or "bytes" not in entry or "sha256" not in entry:
            raise CheckpointError(f"{manifest_path}: no entry for {name}")
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing") from None
        if len(data) != entry["bytes"]:
            raise CheckpointError(f"{file}: {len(data)} bytes, the manifest records {entry['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{file}: contents do not match the manifest's SHA-256 (corrupt)")
        try:
            out[name] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=name not in pickled)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err})") from None
    return out
