"""Measures what the paged step is made of on this machine, in a few seconds: host memory
(available, and its copy bandwidth), the disk at nvme_path (direct-IO write and read, as the
NVMe store does them), the SIMD update's rate per state format and thread count (the paged
optimizers themselves on host pages), and, with CUDA, the GPU's free memory and pinned copy
bandwidth each way and both at once.

[Note: probes] Each figure is the best of a few short repeats (the machine's rate, not its
noise); sizes are small enough to run on a laptop and large enough to leave the caches
(64 MiB and more). Probes are cached per host with their date (save_cache / load_cached), so
a plan can be made again without measuring (`offload-plan probe --no-probe`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import mmap
import os
import platform
import socket
import tempfile
import time

import torch

from ..engine.admission import memory_available
from ..paging import nvme_store

_COPY_BYTES = 256 << 20       # host memory bandwidth: one copy of this much
_DISK_BYTES = 64 << 20        # written, then read back, in chunks of _DISK_CHUNK
_DISK_CHUNK = 4 << 20
_UPDATE_NUMEL = 1 << 24       # one param of this many elements (64 MiB, its state 128 MiB), 1 MiB pages
_GPU_BYTES = 256 << 20
_REPEATS = 3


@dataclasses.dataclass
class MachineProbe:
    """One machine's measured rates (GB/s are 1e9 bytes per second)."""

    host: str
    date: str                       # ISO, UTC
    cpu: str
    cores: int
    torch: str
    host_ram_available: int         # bytes: what admission counts (psutil, capped by the cgroup)
    host_copy_gbps: float           # bytes read + written per second by a large tensor copy
    disk: dict | None               # {"path", "direct_io", "write_gbps", "read_gbps"}, or None when not probed
    update: dict                    # state format -> {threads (str): params updated per second}
    gpu: dict | None                # {"name", "free_bytes", "h2d_gbps", "d2h_gbps", "both_gbps"}, or None
    seconds: float                  # how long the probes took

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "MachineProbe":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"a probe record without {sorted(missing)}: made by another version; probe again")
        return cls(**{k: data[k] for k in names})


def probe_machine(nvme_path: str | None = None, formats=("fp32", "int8"), threads=None) -> MachineProbe:
    """Runs every probe; `nvme_path` (a directory) for the disk, None to leave the disk out;
    `threads`: the thread counts the update is timed at (default 1 and torch's count)."""
    start = time.perf_counter()
    if nvme_path is not None:
        nvme_store.check_directory(nvme_path)  # an unwritable path fails first, naming nvme_path
    counts = sorted(set(threads or (1, torch.get_num_threads())))
    if any(n < 1 for n in counts):
        raise ValueError(f"threads must be positive thread counts, got {counts}")
    probe = MachineProbe(
        host=socket.gethostname(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_name(), cores=os.cpu_count() or 1, torch=torch.__version__,
        host_ram_available=memory_available(), host_copy_gbps=host_copy_gbps(),
        disk=disk_rates(nvme_path) if nvme_path is not None else None,
        update={fmt: {str(n): update_rate(fmt, n) for n in counts} for fmt in formats},
        gpu=gpu_rates() if torch.cuda.is_available() else None, seconds=0.0)
    probe.seconds = round(time.perf_counter() - start, 2)
    return probe


def _best(fn, repeats: int = _REPEATS) -> float:
    """The shortest of `repeats` timed calls of fn(), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def host_copy_gbps() -> float:
    src = torch.ones(_COPY_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # both touched before timing
    return round(2 * _COPY_BYTES / _best(lambda: dst.copy_(src)) / 1e9, 2)


def disk_rates(directory: str) -> dict:
    """Writes a file of _DISK_BYTES in _DISK_CHUNK writes (then fsync), reads it back the same
    way, as the NVMe store opens its files (direct IO where the filesystem takes it)."""
    fd_path = tempfile.mktemp(prefix=".offload_engine_disk_probe_", dir=directory)
    fd, direct = nvme_store.open_file(fd_path)
    chunk = mmap.mmap(-1, _DISK_CHUNK)  # page-aligned, as direct IO needs
    chunk.write(os.urandom(4096) * (_DISK_CHUNK // 4096))
    try:
        def write():
            for offset in range(0, _DISK_BYTES, _DISK_CHUNK):
                os.pwritev(fd, [chunk], offset)
            os.fsync(fd)

        def read():
            for offset in range(0, _DISK_BYTES, _DISK_CHUNK):
                os.preadv(fd, [chunk], offset)
        write_s = _best(write)
        read_s = _best(read)  # without direct IO this is the page cache's rate: marked by direct_io
    finally:
        os.close(fd)
        os.unlink(fd_path)
        chunk.close()
    return {"path": directory, "direct_io": direct, "write_gbps": round(_DISK_BYTES / write_s / 1e9, 3),
            "read_gbps": round(_DISK_BYTES / read_s / 1e9, 3)}


def update_rate(fmt: str, threads: int) -> float:
    """Params per second the paged optimizer's step updates with state format `fmt` ("fp32":
    PagedAdamW, "int8": PagedAdamW8bit) on host pages, at `threads` threads (the page work
    included)."""
    from .. import optim
    classes = {"fp32": optim.PagedAdamW, "int8": optim.PagedAdamW8bit}
    if fmt not in classes:
        raise ValueError(f"state format must be one of {sorted(classes)} (the paged optimizers'), got {fmt!r}")
    before = torch.get_num_threads()
    param = torch.nn.Parameter(torch.randn(_UPDATE_NUMEL))
    param.grad = torch.randn(_UPDATE_NUMEL)
    opt = classes[fmt]([param], lr=1e-3, store="cpu", executor="cpu", page_size_mb=1)
    try:
        torch.set_num_threads(threads)
        opt.step()  # lays out the pages and touches the state
        seconds = _best(opt.step)
    finally:
        torch.set_num_threads(before)
        opt.close()
    return round(_UPDATE_NUMEL / seconds, 1)


def gpu_rates() -> dict:  # pragma: no cover - needs CUDA
    """Free GPU memory, and pinned host <-> GPU copy rates each way and both at once."""
    free, _ = torch.cuda.mem_get_info()
    n = min(_GPU_BYTES, free // 4)
    host_in = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    gpu_in = torch.empty(n, dtype=torch.uint8, device="cuda")
    gpu_out = torch.empty(n, dtype=torch.uint8, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def h2d():
        gpu_in.copy_(host_in, non_blocking=True)
        torch.cuda.synchronize()

    def d2h():
        host_out.copy_(gpu_out, non_blocking=True)
        torch.cuda.synchronize()

    def both():
        # Why two streams: a copy each way at once is what the paged step does (page in, page out).
        with torch.cuda.stream(up):
            gpu_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(down):
            host_out.copy_(gpu_out, non_blocking=True)
        torch.cuda.synchronize()
    h2d()
    d2h()
    return {"name": torch.cuda.get_device_name(), "free_bytes": int(free),
            "h2d_gbps": round(n / _best(h2d) / 1e9, 2), "d2h_gbps": round(n / _best(d2h) / 1e9, 2),
            "both_gbps": round(2 * n / _best(both) / 1e9, 2)}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- the cache ---------------------------------------------------------------------------------
def cache_path() -> str:
    """Where this host's probes are kept: $OFFLOAD_ENGINE_CACHE, else $XDG_CACHE_HOME or
    ~/.cache, under offload_engine/, one file per host."""
    root = os.environ.get("OFFLOAD_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "offload_engine")
    return os.path.join(root, f"probe-{socket.gethostname()}.json")


def save_cache(probe: MachineProbe, path: str | None = None) -> str:
    """Writes `probe` to `path` (default cache_path()) atomically; returns the path."""
    path = path or cache_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(probe.to_json(), f, indent=1)
    os.replace(tmp, path)
    return path


def load_cached(path: str | None = None) -> MachineProbe:
    """The probes saved at `path` (default cache_path()); a clear error when there are none."""
    path = path or cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no cached probes at {path}: run `offload-plan probe` once without --no-probe")
    except json.JSONDecodeError as err:
        raise ValueError(f"the cached probes at {path} are not JSON ({err}); probe again") from err
    return MachineProbe.from_json(data)
