"""NvmeStore: optimizer-state pages in one file per rank, read and written by a small IO pool.

[Note: shadow pages] Each page has two places in the file, A and B. A step reads a page from
its current place and writes the updated page to the other one; ``commit`` switches the
current place of every page written in the step only after all of their writes completed.
So a step that fails anywhere (an IO error, a kernel error, Ctrl-C) leaves the stored state
exactly as it was before the step, and no page can ever be read torn. The file is reserved
in full (posix_fallocate) when pages are added, so a full disk is reported then, before any
state is written, and never in the middle of a step. Cost: the file is twice the state.

Direct IO (O_DIRECT) is used when the filesystem accepts it, so pages do not also fill the
page cache; otherwise buffered IO. Pages are whole 4 KiB blocks at block-aligned offsets and
the pool's slots are 4 KiB aligned, which direct IO requires.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import itertools
import mmap
import os
import threading
import time
import weakref

import torch

from .stores import PageIOError, register_store

_file_ids = itertools.count()


def _buffer(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor (for os.preadv/pwritev)."""
    return memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())).cast("B")


def _rank() -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _open_probe(directory: str) -> None:
    """Raises ValueError naming nvme_path when `directory` cannot hold a state file."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".offload_engine_probe_{os.getpid()}_{next(_file_ids)}")
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise ValueError(f"nvme_path={directory!r} cannot be written: {err.strerror or err}") from err


def check_directory(directory: str) -> None:
    """Raises ValueError naming nvme_path when `directory` cannot hold a state file."""
    _open_probe(directory)


def open_file(path: str) -> tuple[int, bool]:
    """Creates `path` (it must not exist) as the store opens its state file: with O_DIRECT
    where the filesystem takes an aligned direct write and read back; returns (fd, direct)."""
    return _open_state_file(path)


def _open_state_file(path: str) -> tuple[int, bool]:
    """Opens a new state file, with O_DIRECT when the filesystem takes an aligned direct
    write and read back; returns (fd, direct)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    if hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError:
            fd = None
        if fd is not None:
            probe = mmap.mmap(-1, 4096)  # page-aligned, as direct IO requires
            try:
                ok = os.pwritev(fd, [probe], 0) == 4096 and os.preadv(fd, [probe], 0) == 4096
            except OSError:
                ok = False
            os.ftruncate(fd, 0)
            if ok:
                return fd, True
            os.close(fd)
            os.unlink(path)
    return os.open(path, flags, 0o600), False


def _close_file(fd: int, path: str, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    # Never joins the IO threads: as the store's finalizer this runs inside garbage collection,
    # in whatever thread triggered it - an IO thread itself, or a thread still starting up
    # while another waits in Thread.start() for it (a join there deadlocked a test run). No IO
    # is in flight then: every queued or running transfer holds a reference to its store.
    # close() waits for the threads before it gets here.
    pool.shutdown(wait=False)
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


@register_store
class NvmeStore:
    """Pages in `<nvme_path>/offload_engine-rank<r>-<pid>-<n>.pages`, two places per page
    ([Note: shadow pages]); the file is removed when the store is closed or collected."""

    kind = "nvme"
    access = "io"  # read/write through slots only ([PageStore] in protocols.py)
    in_place = False

    def __init__(self, page_bytes: int, nvme_path: str, *, io_threads: int = 4):
        if not isinstance(nvme_path, (str, os.PathLike)) or not str(nvme_path):
            raise ValueError(f"store='nvme' needs nvme_path, a writable directory; got nvme_path={nvme_path!r}")
        directory = os.fspath(nvme_path)
        _open_probe(directory)
        self.page_bytes = page_bytes
        self.num_pages = 0
        self.path = os.path.join(directory, f"offload_engine-rank{_rank()}-{os.getpid()}-{next(_file_ids)}.pages")
        self._fd, self.direct = _open_state_file(self.path)
        self._current = bytearray()  # per page: 0 = place A is current, 1 = place B
        self._io_lock = threading.Lock()  # guards the IO seconds the threads add up
        self._read_s = self._write_s = 0.0
        # IO runs in these threads: os.preadv/pwritev release the GIL, so reads and writes of
        # several pages proceed while the main thread runs the update kernel.
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="oe-nvme")
        self._finalizer = weakref.finalize(self, _close_file, self._fd, self.path, self._io)

    copies_per_page = 2  # [Note: shadow pages]

    @classmethod
    def from_spec(cls, spec, pinned: bool) -> "NvmeStore":
        return cls(spec.page_bytes, spec.nvme_path, io_threads=spec.io_threads)  # pinned: the pool's concern

    def describe(self) -> str:
        return self.path

    @property
    def nbytes(self) -> int:
        """Bytes the store holds at rest (both places of every page)."""
        return 2 * self.num_pages * self.page_bytes

    def _offset(self, page: int, place: int) -> int:
        return (2 * page + place) * self.page_bytes

    def allocate(self, num_pages: int) -> None:
        """Reserves room for `num_pages` pages. On failure (disk full, file size limit) the
        file is cut back to its old size and the pages stored so far are untouched."""
        if num_pages <= self.num_pages:
            return
        old, new = 2 * self.num_pages * self.page_bytes, 2 * num_pages * self.page_bytes
        try:
            os.posix_fallocate(self._fd, old, new - old)
        except OSError as err:
            try:
                os.ftruncate(self._fd, old)
            except OSError:
                pass
            raise PageIOError(f"cannot reserve {new - old} bytes for {num_pages - self.num_pages} pages of optimizer "
                              f"state in {self.path}: {err.strerror or err}", path=self.path) from err
        self._current.extend(bytes(num_pages - self.num_pages))
        self.num_pages = num_pages

    def check(self) -> None:
        """Raises PageIOError when the state file was deleted or truncated since the last step
        (an open file outlives its name, so a deleted file would otherwise go unnoticed)."""
        try:
            st = os.fstat(self._fd)
        except OSError as err:
            raise PageIOError(f"state file {self.path} is no longer accessible: {err.strerror}", path=self.path) from err
        if st.st_nlink == 0 or not os.path.exists(self.path):
            raise PageIOError(f"state file {self.path} was deleted while the optimizer was using it; its state is "
                              "lost: reload a checkpoint", path=self.path)
        expected = 2 * self.num_pages * self.page_bytes
        if st.st_size < expected:
            raise PageIOError(f"state file {self.path} was truncated to {st.st_size} bytes (the optimizer's "
                              f"{self.num_pages} pages need {expected}): reload a checkpoint", path=self.path)

    def read(self, page: int, buf: torch.Tensor) -> concurrent.futures.Future:
        return self._io.submit(self._read, page, buf)

    def write(self, page: int, buf: torch.Tensor) -> concurrent.futures.Future:
        """Writes to the page's other place; it becomes current at commit()."""
        return self._io.submit(self._write, page, buf)

    def commit(self, pages) -> None:
        for page in pages:
            self._current[page] ^= 1

    def take_io_seconds(self) -> tuple[float, float]:
        """Seconds the IO threads spent reading and writing since the last call."""
        with self._io_lock:
            out, self._read_s, self._write_s = (self._read_s, self._write_s), 0.0, 0.0
        return out

    def close(self) -> None:
        self._io.shutdown(wait=True)  # transfers the caller's futures still await finish before the fd goes
        self._finalizer()

    # ---- IO thread side -------------------------------------------------------------------
    def _read(self, page: int, buf: torch.Tensor) -> None:
        self._transfer(page, buf, self._current[page], write=False)

    def _write(self, page: int, buf: torch.Tensor) -> None:
        self._transfer(page, buf, self._current[page] ^ 1, write=True)

    def _transfer(self, page: int, buf: torch.Tensor, place: int, *, write: bool) -> None:
        """Moves one whole page between `buf` and its `place` in the file (short transfers
        are continued; a read that meets the end of the file is a truncated file)."""
        offset = self._offset(page, place)
        view = _buffer(buf)
        io = os.pwritev if write else os.preadv
        done, t = 0, time.perf_counter()
        try:
            while done < self.page_bytes:
                n = io(self._fd, [view[done:]], offset + done)
                if n == 0 and write:
                    raise OSError(errno.EIO, "wrote 0 bytes")
                if n == 0:
                    raise PageIOError(f"page {page}: the state file {self.path} ends at byte {offset + done}, inside "
                                      "the page (truncated?)", page=page, path=self.path)
                done += n
        except OSError as err:
            raise PageIOError(f"page {page}: {'writing' if write else 'reading'} {self.path} at offset "
                              f"{offset + done} failed: {err.strerror or err}", page=page, path=self.path) from err
        with self._io_lock:
            if write:
                self._write_s += time.perf_counter() - t
            else:
                self._read_s += time.perf_counter() - t
