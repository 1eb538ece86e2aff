"""Admission check: does this node have the RAM and disk for the optimizer state of all its
ranks? Run by initialize() once the optimizer is built, before any state exists.

[Note: admission] Ranks on one node share its RAM and disks, and each allocates its state
lazily, at its first step ([Note: lazy layout] in optim/paged.py), so a node that cannot hold
the state of all of its ranks would otherwise fail mid-run, or push the machine into swap.
At initialize each rank estimates what it will allocate:
- host RAM: the host store's pages (store 'cpu'), or the NVMe store's slot pool
  (prefetch_depth + 2 pages), or the state tensors of a non-paged optimizer on CPU params;
- disk: the NVMe file, twice the pages ([Note: shadow pages] in paging/nvme_store.py);
and measures what the node has: psutil's available memory (capped by the cgroup's memory
limit, as in a container) and shutil.disk_usage of nvme_path. The estimates are all-gathered,
and every rank checks every node (the ranks sharing a host name; for disk, the ranks whose
nvme_path is on the same filesystem of that host). All ranks therefore raise together, with
the same numbers, rather than one failing and the others waiting in a collective.

OFFLOAD_ENGINE_NODE_MEMORY_BYTES / OFFLOAD_ENGINE_NODE_DISK_BYTES replace the measured figure
(a budget for the state when the node runs other work, or to exercise the check in tests).

[Note: node IO] Ranks on one node also share its disk's bandwidth. The config's
paging.io_threads is read as the node's IO thread budget for NVMe state: each of L ranks on a
node gets max(1, io_threads // L) threads, so a node runs max(io_threads, L) page transfers at
a time however many ranks it has.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket

import psutil
import torch
import torch.distributed as dist

from ..config import ConfigError
from ..optim._base import BlockwiseOptimizer
from ..optim.sharded import local_numel

MEMORY_ENV = "OFFLOAD_ENGINE_NODE_MEMORY_BYTES"
DISK_ENV = "OFFLOAD_ENGINE_NODE_DISK_BYTES"


class AdmissionError(ConfigError):
    """The node cannot hold the optimizer state of its ranks; names the config key to change."""


@dataclasses.dataclass(frozen=True)
class Demand:
    """What one rank will allocate, and what its node has (as that rank measured it)."""

    rank: int
    host: str
    memory_bytes: int             # host RAM the rank's state will take
    memory_available: int
    disk_bytes: int = 0           # NVMe file bytes
    disk_path: str | None = None  # the rank's nvme_path
    disk_id: int | None = None    # st_dev of nvme_path: ranks on one host with one filesystem share it
    disk_free: int | None = None
    error: str | None = None      # the rank could not estimate (then every rank raises it)


# ---- this node --------------------------------------------------------------------------------
def host_name() -> str:
    return socket.gethostname()


def gather_hosts(group=None) -> list[str]:
    """Every rank's host name (rank order); ranks with equal names share a node."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return [host_name()]
    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, host_name(), group=group)
    return hosts


def io_threads_per_rank(io_threads: int, ranks_on_node: int) -> int:
    """[Note: node IO]: the node's io_threads budget shared by its ranks (each keeps one)."""
    return max(1, io_threads // max(1, ranks_on_node))


def node_io_threads(io_threads: int, group=None) -> int:
    """This rank's share of the node's io_threads ([Note: node IO]); one all-gather of host
    names when there are several ranks."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return io_threads
    hosts = gather_hosts(group)
    return io_threads_per_rank(io_threads, hosts.count(hosts[dist.get_rank(group)]))


def _env_bytes(name: str) -> int | None:
    raw = os.environ.get(name, "")
    if not raw:
        return None
    try:
        value = int(float(raw))
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}={raw!r}: must be a number of bytes >= 0")
    return value


def _cgroup_memory_left() -> int | None:
    """Bytes the cgroup (v2) may still allocate, when it has a limit: /proc/meminfo, which psutil
    reads, shows the whole machine even inside a container."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def memory_available() -> int:
    override = _env_bytes(MEMORY_ENV)
    if override is not None:
        return override
    available = psutil.virtual_memory().available
    left = _cgroup_memory_left()
    return available if left is None else min(available, left)


def disk_free(path: str) -> int:
    override = _env_bytes(DISK_ENV)
    return override if override is not None else shutil.disk_usage(path).free


# ---- this rank's state ------------------------------------------------------------------------
def _trainable(optimizer):
    """(group index, group, param) for every param that can get state."""
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.requires_grad:
                yield gi, group, p


def state_bytes(optimizer) -> tuple[int, int, str | None]:
    """(host RAM bytes, disk bytes, nvme_path) this rank's optimizer will allocate for the state
    of all its trainable params, less what it holds already. (0, 0, None) for an optimizer this
    package does not know, or state that lives on a GPU (not the node's RAM)."""
    from ..optim.paged import PagedOptimizer

    if isinstance(optimizer, PagedOptimizer):
        # The layout the optimizer will make ([Note: lazy layout]), here for all params at once,
        # sized by the one slot rule ([Note: slot rule] in paging/footprint.py). GPU slots are
        # not the node's RAM.
        planned, held = optimizer.planned_footprint()
        todo = planned.beyond(held)
        stats = optimizer.paging_stats()
        path = os.path.dirname(stats["path"]) if stats["path"] else None
        return todo.host_ram, todo.disk, path
    if isinstance(optimizer, BlockwiseOptimizer):
        total = 0
        for _, group, p in _trainable(optimizer):
            if p.device.type != "cpu" or optimizer.state.get(p):
                continue
            total += optimizer.state_format_for(group, p).logical_bytes(local_numel(p))
        return total, 0, None
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        total = 0
        for _, group, p in _trainable(optimizer):
            if p.device.type == "cpu" and not optimizer.state.get(p):
                total += (3 if group.get("amsgrad") else 2) * p.numel() * p.element_size()
        return total, 0, None
    return 0, 0, None


def measure(optimizer, rank: int = 0, extra_bytes: int = 0) -> Demand:
    """This rank's Demand, `extra_bytes` of host memory the engine holds beside the state
    included (the param copies of paging.overlap "delayed"); an estimate that fails is carried
    in it, not raised, so that the gather that follows still happens on every rank."""
    try:
        memory, disk, path = state_bytes(optimizer)
        memory += extra_bytes
        demand = Demand(rank, host_name(), memory, memory_available(), disk, path)
        if path is not None:
            demand = dataclasses.replace(demand, disk_id=os.stat(path).st_dev, disk_free=disk_free(path))
        return demand
    except Exception as err:  # noqa: BLE001 -- reported on every rank by check()
        return Demand(rank, host_name(), 0, 0, error=f"{type(err).__name__}: {err}")


# ---- the check --------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.2f} {unit})"
    return f"{n} bytes"


def check(demands: list[Demand]) -> None:
    """Raises AdmissionError when some node's ranks need more RAM, or more disk on one
    filesystem, than it has. Pure: every rank runs it on the same gathered list."""
    world = len(demands)
    for d in demands:
        if d.error is not None:
            raise RuntimeError(f"admission check: rank {d.rank} on host {d.host!r} could not estimate its optimizer "
                               f"state: {d.error}")
    nodes: dict[str, list[Demand]] = {}
    for d in demands:
        nodes.setdefault(d.host, []).append(d)
    for host, ranks in nodes.items():
        needed = sum(d.memory_bytes for d in ranks)
        available = min(d.memory_available for d in ranks)  # each rank read it; the least is the safe one
        if needed > available:
            per_rank = ", ".join(f"rank {d.rank}: {_size(d.memory_bytes)}" for d in ranks)
            raise AdmissionError.single("paging.store", (
                f"the optimizer state does not fit in host memory on node {host!r}: its {len(ranks)} rank(s) of a "
                f"world of {world} need {_size(needed)} ({per_rank}), and {_size(available)} is available "
                f"({MEMORY_ENV} or else psutil's available memory). Page the state to disk (paging.store 'nvme' "
                "with paging.nvme_path), make it smaller (paging.state_dtype 'int8' or 'int4'), or spread the "
                "ranks over more nodes"))
        filesystems: dict[int, list[Demand]] = {}
        for d in ranks:
            if d.disk_path is not None:
                filesystems.setdefault(d.disk_id, []).append(d)
        for on_fs in filesystems.values():
            needed = sum(d.disk_bytes for d in on_fs)
            free = min(d.disk_free for d in on_fs)
            if needed > free:
                per_rank = ", ".join(f"rank {d.rank}: {_size(d.disk_bytes)} under {d.disk_path}" for d in on_fs)
                raise AdmissionError.single("paging.nvme_path", (
                    f"the NVMe state files do not fit on node {host!r}: its {len(on_fs)} rank(s) of a world of "
                    f"{world} writing to this filesystem need {_size(needed)} (two copies of every page; "
                    f"{per_rank}), and {_size(free)} is free ({DISK_ENV} or else the filesystem's free space). "
                    "Point nvme_path at a larger disk, make the state smaller (paging.state_dtype 'int8' or "
                    "'int4'), or spread the ranks over more nodes"))


def admit(optimizer, group=None, extra_bytes: int = 0) -> list[Demand]:
    """[Note: admission]: measures this rank, gathers every rank's figures and checks every
    node. Returns the gathered Demands (rank order)."""
    distributed = dist.is_initialized() and dist.get_world_size(group) > 1
    mine = measure(optimizer, dist.get_rank(group) if distributed else 0, extra_bytes)
    demands = [mine]
    if distributed:
        demands = [None] * dist.get_world_size(group)
        dist.all_gather_object(demands, mine, group=group)
    check(demands)
    return demands
