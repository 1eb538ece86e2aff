"""Shared memory between the data-parallel ranks of one host (gloo, CPU params).

[Note: same-host shared memory] When every rank of a gloo group runs on the same host, the
collectives of a step are copies between processes on the same memory: gloo does them over
loopback TCP (through the kernel, twice). Mapping one /dev/shm file into every rank lets them
be plain memory reads instead (partition.py, [Note: shared params]):

  - the trainable params live in the file, one copy for the node: an owner's update writes
    every rank's param, and gathering params is a barrier;
  - each rank has an outbox in the file for the grads of the slices other ranks own; an owner
    adds its peers' outboxes into its own grads.

The file is created by the group's first rank, space reserved with posix_fallocate (a tmpfs
that cannot hold it fails there, cleanly, instead of raising SIGBUS at the first touch of a
page beyond its size: Docker's default /dev/shm is 64 MiB), mapped by every rank, and
unlinked once all have mapped it, inside initialize: however the job ends after that, nothing
is left in /dev/shm (the memory goes with the last mapping).
Any failure on any rank leaves every rank on the gloo path, with the reason logged.
"""
from __future__ import annotations

import mmap
import os
import socket
import uuid

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
ALIGN_BYTES = 4096  # every region starts on a page: SIMD loads stay aligned, no false sharing


def _host_id() -> tuple[str, str]:
    """This host's name and boot id: ranks that report the same pair share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return socket.gethostname(), boot


def host_ids(group=None) -> list[tuple[str, str] | None]:
    """Each rank's host (its name and boot id), in `group`'s rank order; None for a rank whose
    boot id is unknown, which shares memory with no one. A collective: every rank calls it."""
    ids = [None] * dist.get_world_size(group)
    dist.all_gather_object(ids, _host_id(), group=group)
    return [i if i[1] else None for i in ids]


class SharedArena:
    """`nbytes` of memory that every rank of `group` maps; regions of it are tensors.

    Each region is a tensor over its own storage (torch.frombuffer at an offset), not a view of
    one big tensor: a param saved with torch.save or safetensors is its own bytes, not the
    whole arena, and no two params look as if they shared memory."""

    def __init__(self, mapped: mmap.mmap):
        self._map = mapped  # kept alive by every region's storage too

    @classmethod
    def create(cls, nbytes: int, group=None, directory: str | None = None) -> tuple[SharedArena | None, str]:
        """(the arena, "") on every rank, or (None, why not) on every rank. A collective; the
        file goes in `directory` (default SHM_DIR)."""
        directory = directory or SHM_DIR
        first = dist.get_global_rank(group, 0) if group is not None else 0
        path, reason = None, ""
        if dist.get_rank() == first:
            path, reason = _reserve(directory, nbytes)
        box = [(path, reason)]
        dist.broadcast_object_list(box, src=first, group=group)
        path, reason = box[0]
        mapped = None
        if path is not None:
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)  # the mapping outlives the descriptor
            except OSError as err:
                reason = f"mapping {path} failed: {err}"
        reasons = [None] * dist.get_world_size(group)
        # Why: every rank must have mapped the file (or learn that one could not) before the
        # first rank unlinks it and before anyone relies on it.
        dist.all_gather_object(reasons, reason, group=group)
        if path is not None and dist.get_rank() == first:
            os.unlink(path)  # the mappings keep the memory; the name goes now
        failed = [r for r in reasons if r]
        if failed:
            return None, failed[0]
        return cls(mapped), ""

    def region(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements of `dtype` at `offset` bytes into the arena, over a
        storage of its own."""
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset)


def _reserve(directory: str, nbytes: int) -> tuple[str | None, str]:
    """A new file of `nbytes` in `directory` with its space reserved: (path, "") or (None, why)."""
    path = os.path.join(directory, f"offload_engine-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as err:
        return None, f"cannot create a file in {directory}: {err}"
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        os.close(fd)
        os.unlink(path)
        free = _free_bytes(directory)
        return None, (f"{directory} cannot hold {nbytes / 2**20:,.0f} MiB ({err.strerror}; "
                      f"{free / 2**20:,.0f} MiB free)")
    os.close(fd)
    return path, ""


def _free_bytes(directory: str) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
