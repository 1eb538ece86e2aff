"""Measures what the paged step is made of on this machine, in a few seconds: host memory
(available, and its copy bandwidth), the disk at nvme_path (direct-IO write, read and both at
once from the store's IO threads, as the NVMe store moves pages), the SIMD update's rate per
state format, param dtype and thread count (the paged optimizers themselves on host pages) and
what a step costs per param beyond its elements, and, with CUDA, the GPU's free memory and pinned copy
bandwidth each way and both at once.

[Note: probes] Each figure is the best of a few short repeats (the machine's rate, not its
noise); sizes are small enough to run on a laptop and large enough to leave the caches
(64 MiB and more). Probes are cached per host with their date (save_cache / load_cached), so
a plan can be made again without measuring (`offload-plan probe --no-probe`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import mmap
import os
import platform
import socket
import statistics
import tempfile
import time

import torch

from ..engine.admission import memory_available
from ..paging import nvme_store
from ..paging.layout import page_bytes_from_mb
from .candidates import PAGE_SIZES_MB

_COPY_BYTES = 256 << 20       # host memory bandwidth: one copy of this much
_DISK_BYTES = 256 << 20       # written, read back, then half read while half is written, a page at a time
_UPDATE_NUMEL = 1 << 24       # one param of this many elements (64 MiB, its state 128 MiB), at each page size
_SMALL_PARAMS, _SMALL_NUMEL = 256, 4096  # the per-param overhead: many params of little work
_GPU_BYTES = 256 << 20
_REPEATS = 5
_UPDATE_ROUNDS = 3  # [Note: interleaved update probes]


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
    disk: dict | None               # {"path", "direct_io", "io_threads", "by_page_mb": {page MiB (str):
                                    # {"write_gbps", "read_gbps", "both_gbps"}}}, or None when not probed
    update: dict                    # "fp32" | "int8" (fp32 params), "fp32+master" | "int8+master" (bf16
                                    # params, fp32 master weights paged with the state)
                                    # -> {page MiB (str): {threads (str): params updated per second}}
    param_overhead_s: dict          # "fp32", "int8+master", ... -> {threads: a step's seconds per param beyond its elements}
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


def probe_machine(nvme_path: str | None = None, formats=("fp32", "int8"), threads=None,
                  io_threads: int = 4, page_sizes_mb=PAGE_SIZES_MB) -> MachineProbe:
    """Runs every probe; `nvme_path` (a directory) for the disk, None to leave the disk out;
    `threads`: the thread counts the update is timed at (default 1 and torch's count);
    `page_sizes_mb`: the page sizes the update and the disk are timed at (the planner's)."""
    start = time.perf_counter()
    if nvme_path is not None:
        nvme_store.check_directory(nvme_path)  # an unwritable path fails first, naming nvme_path
    counts = sorted(set(threads or (1, torch.get_num_threads())))
    if any(n < 1 for n in counts):
        raise ValueError(f"threads must be positive thread counts, got {counts}")
    pages = [float(mb) for mb in page_sizes_mb]
    probe = MachineProbe(
        host=socket.gethostname(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_name(), cores=os.cpu_count() or 1, torch=torch.__version__,
        host_ram_available=memory_available(), host_copy_gbps=host_copy_gbps(),
        disk=disk_rates(nvme_path, io_threads, pages) if nvme_path is not None else None,
        update=update_rates(formats, counts, pages),
        param_overhead_s={f"{fmt}{'+master' if master else ''}": {str(n): param_overhead_s(fmt, n, master)
                                                                   for n in counts}
                          for master in (False, True) for fmt in formats},
        gpu=gpu_rates() if torch.cuda.is_available() else None, seconds=0.0)
    probe.seconds = round(time.perf_counter() - start, 2)
    return probe


def _key(page_mb: float) -> str:
    """A page size as the probe record keys it: "1", "4", "0.5"."""
    return f"{page_mb:g}"


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


def disk_rates(directory: str, io_threads: int = 4, page_sizes_mb=PAGE_SIZES_MB) -> dict:
    """At each page size, the median of _REPEATS rounds, each on a fresh file:
      write, read   _DISK_BYTES written, then read back, a page per transfer from `io_threads`
                    threads (the file opened as the NVMe store opens its files, direct IO where
                    the filesystem takes it; preadv/pwritev release the GIL, so the threads'
                    transfers are in flight together): what the pipeline's ends cost;
      both          the NVMe store itself: bytes read and written per second by a paged
                    optimizer's step over one param of _UPDATE_NUMEL elements (fp32 state), whose
                    IO, not its update, sets the step: the rate pages move at with the store's
                    own reads and writes in flight together.
    The median, not the best: a disk's rate wanders from file to file and minute to minute
    (its cache; its neighbours on a virtual machine), and a step of many pages sees the
    typical rate."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="oe-disk-probe")
    by_page, direct = {}, False
    rounds: dict = {mb: [] for mb in page_sizes_mb}
    stores: dict = {mb: [] for mb in page_sizes_mb}
    try:
        # Round by round over the page sizes, not page size by page size: a slow spell of the
        # disk then falls on every page size alike, not on one ([Note: interleaved update probes]).
        for _ in range(_REPEATS):
            for mb in page_sizes_mb:
                seconds, direct = _disk_round(directory, pool, io_threads, page_bytes_from_mb(mb))
                rounds[mb].append(seconds)
                stores[mb].append(_store_rate(directory, mb, io_threads))
        for mb in page_sizes_mb:
            total = _disk_bytes(io_threads, page_bytes_from_mb(mb))
            w, r = (statistics.median(x[i] for x in rounds[mb]) for i in range(2))
            by_page[_key(mb)] = {"write_gbps": round(total / w / 1e9, 3), "read_gbps": round(total / r / 1e9, 3),
                                 "both_gbps": round(statistics.median(stores[mb]) / 1e9, 3)}
    finally:
        pool.shutdown()
    return {"path": directory, "direct_io": direct, "io_threads": io_threads, "by_page_mb": by_page}


def _store_rate(directory: str, page_size_mb: float, io_threads: int) -> float:
    """Bytes per second an NVMe-store step moves (read + written) on a fresh file."""
    param = torch.nn.Parameter(torch.randn(_UPDATE_NUMEL))
    param.grad = torch.randn_like(param)
    opt = _paged_optimizer("fp32", [param], page_size_mb=page_size_mb, store="nvme", nvme_path=directory,
                           io_threads=io_threads)
    try:
        opt.step()  # lays out the pages: the file is written once
        seconds = _best(opt.step, 2)
        last = opt.paging_stats()["last_step"]
        return (last["bytes_read"] + last["bytes_written"]) / seconds
    finally:
        opt.close()


def _disk_bytes(io_threads: int, chunk_bytes: int) -> int:
    """Bytes of a round's file for transfers of `chunk_bytes`."""
    return max(_DISK_BYTES, 2 * io_threads * chunk_bytes) // chunk_bytes * chunk_bytes


def _disk_round(directory: str, pool, io_threads: int, chunk_bytes: int) -> tuple[tuple, bool]:
    """((write, read) seconds, direct IO) on a fresh file."""
    path = tempfile.mktemp(prefix=".offload_engine_disk_probe_", dir=directory)
    fd, direct = nvme_store.open_file(path)
    chunks = [mmap.mmap(-1, chunk_bytes) for _ in range(io_threads)]  # page-aligned, as direct IO needs
    for chunk in chunks:
        chunk.write(os.urandom(4096) * (chunk_bytes // 4096))
    offsets = list(range(0, _disk_bytes(io_threads, chunk_bytes), chunk_bytes))

    def run(is_write: bool):
        def worker(i):
            for offset in offsets[i::io_threads]:  # each thread its own buffer
                (os.pwritev if is_write else os.preadv)(fd, [chunks[i]], offset)
        list(pool.map(worker, range(io_threads)))

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def write():
        run(True)
        os.fsync(fd)
    try:
        # without direct IO the read is the page cache's rate (direct_io says so)
        return (timed(write), timed(lambda: run(False))), direct
    finally:
        for chunk in chunks:
            chunk.close()
        os.close(fd)
        os.unlink(path)


def _paged_optimizer(fmt: str, params, store: str = "cpu", **kwargs):
    from .. import optim
    classes = {"fp32": optim.PagedAdamW, "int8": optim.PagedAdamW8bit}
    if fmt not in classes:
        raise ValueError(f"state format must be one of {sorted(classes)} (the paged optimizers'), got {fmt!r}")
    return classes[fmt](params, lr=1e-3, store=store, executor="cpu", **kwargs)


def _timed_step(opt, threads: int) -> float:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        opt.step()  # lays out the pages and touches the state
        return _best(opt.step)
    finally:
        torch.set_num_threads(before)
        opt.close()


def update_rate(fmt: str, threads: int, master: bool = False, page_size_mb: float = 1.0) -> float:
    """Params per second the paged optimizer's step updates with state format `fmt` ("fp32":
    PagedAdamW, "int8": PagedAdamW8bit) on host pages of `page_size_mb`, at `threads` threads
    (the page work included); `master`: bf16 params, whose fp32 master weights are paged with
    the state."""
    param = torch.nn.Parameter(torch.randn(_UPDATE_NUMEL, dtype=torch.bfloat16 if master else torch.float32))
    param.grad = torch.randn_like(param)
    opt = _paged_optimizer(fmt, [param], page_size_mb=page_size_mb, master_weights=master)
    return round(_UPDATE_NUMEL / _timed_step(opt, threads), 1)


def update_rates(formats, counts, pages_mb, rounds: int = _UPDATE_ROUNDS, repeats: int = 2) -> dict:
    """{format key: {page MiB: {threads: params per second}}} for every state format (with and
    without master weights), page size and thread count, as update_rate() measures each one.

    [Note: interleaved update probes] Timed one configuration after another, a slow spell of
    the machine (a VM's neighbour, a frequency dip) lasting a few hundred milliseconds lands on
    the few configurations probed during it, and the planner then ranks them wrongly: on a
    2-core VM one page size's rate came out 25% below its neighbours' in one probe and not in
    the next. So every configuration keeps one optimizer (over one shared param per dtype; the
    state is its own), and `rounds` rounds each time every configuration `repeats` times; the
    best over the rounds is kept, each configuration sampled across the whole probe."""
    fp32 = torch.nn.Parameter(torch.randn(_UPDATE_NUMEL))
    fp32.grad = torch.randn_like(fp32)
    bf16 = torch.nn.Parameter(torch.randn(_UPDATE_NUMEL, dtype=torch.bfloat16))
    bf16.grad = torch.randn_like(bf16)
    opts = {}
    try:
        for master in (False, True):
            for fmt in formats:
                for mb in pages_mb:
                    opt = _paged_optimizer(fmt, [bf16 if master else fp32], page_size_mb=mb, master_weights=master)
                    opts[(f"{fmt}{'+master' if master else ''}", _key(mb))] = opt
                    opt.step()  # lays out the pages and touches the state
        best: dict = {}
        before = torch.get_num_threads()
        try:
            for _ in range(rounds):
                for (fmt, mb), opt in opts.items():
                    for n in counts:
                        torch.set_num_threads(n)
                        seconds = _best(opt.step, repeats)
                        key = (fmt, mb, str(n))
                        best[key] = min(best.get(key, float("inf")), seconds)
        finally:
            torch.set_num_threads(before)
    finally:
        for opt in opts.values():
            opt.close()
    out: dict = {}
    for (fmt, mb, n), seconds in best.items():
        out.setdefault(fmt, {}).setdefault(mb, {})[n] = round(_UPDATE_NUMEL / seconds, 1)
    return out


def param_overhead_s(fmt: str, threads: int = 1, master: bool = False) -> float:
    """Seconds a step spends per param beyond its elements' update (its job, its segments; with
    `master`, bf16 params whose fp32 masters are paged, the param's copy from its master too):
    a step over _SMALL_PARAMS small params, less the same elements' update as one param, at
    the step's own thread count."""
    dtype = torch.bfloat16 if master else torch.float32
    params = [torch.nn.Parameter(torch.randn(_SMALL_NUMEL, dtype=dtype)) for _ in range(_SMALL_PARAMS)]
    for p in params:
        p.grad = torch.randn_like(p)
    one = torch.nn.Parameter(torch.randn(_SMALL_PARAMS * _SMALL_NUMEL, dtype=dtype))
    one.grad = torch.randn_like(one)
    many_s = _timed_step(_paged_optimizer(fmt, params, page_size_mb=1, master_weights=master), threads)
    one_s = _timed_step(_paged_optimizer(fmt, [one], page_size_mb=1, master_weights=master), threads)
    return max(0.0, (many_s - one_s) / (_SMALL_PARAMS - 1))


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
