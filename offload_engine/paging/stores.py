"""Page stores: where optimizer state rests between steps.

Every store (the PageStore Protocol in protocols.py) moves whole pages (``page_bytes``) between its storage and a caller's buffer:
``read(page, buf)`` and ``write(page, buf)`` return a Future to wait on, ``commit(pages)``
makes the pages written in a step the current ones. A store whose ``in_place`` is true also
hands out ``page_view(page)``: the CPU executor then updates the stored bytes directly.

HostStore keeps all pages in host memory (pinned when a GPU executor will copy from it).
NvmeStore (nvme_store.py) keeps them in one file per rank.
"""
from __future__ import annotations

import concurrent.futures

import torch


class PagingError(RuntimeError):
    """A step could not be paged: names the page (and the file, for a file store)."""

    def __init__(self, message: str, *, page: int | None = None, path: str | None = None):
        super().__init__(message)
        self.page = page
        self.path = path


class PageIOError(PagingError):
    """Reading, writing or reserving a page of the store failed."""


# The stores by the config's name for them (``paging.store``, the optimizers' ``store=``). A new
# store is one class with the PageStore members (protocols.py) and a ``from_spec(spec, pinned)``
# constructor, registered with @register_store; the pager, the slot rule and the config's
# validation find it here.
_STORE_TYPES: dict = {}


def register_store(cls):
    _STORE_TYPES[cls.kind] = cls
    return cls


def store_names() -> tuple:
    _load_builtin_stores()
    return tuple(_STORE_TYPES)


def store_type(name: str):
    """The store class registered as `name`; ValueError naming the allowed ones otherwise."""
    _load_builtin_stores()
    try:
        return _STORE_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"store must be one of {', '.join(map(repr, _STORE_TYPES))}; got store={name!r}") from None


def _load_builtin_stores() -> None:
    from . import managed_store, nvme_store  # noqa: F401 -- each registers its class


def done_future(result=None) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(result)
    return future


# [Note: pinned chunks] torch's pinned host allocator rounds every request up to a power of
# two: one 96 GB pinned arena asks the driver for 128 GiB (and fails on a 125 GiB host), one of
# 40 GB pins 64 GiB. So the arena is chunks of at most HOST_CHUNK_BYTES, each a whole number of
# pages (a page never straddles two chunks): with power-of-two pages every chunk but the last
# is exactly a power of two, and the rounding costs at most the last chunk's size.
HOST_CHUNK_BYTES = 1 << 30


@register_store
class HostStore:
    """All pages in host memory (chunks of whole pages, [Note: pinned chunks]); the CPU
    executor updates them in place."""

    kind = "cpu"
    access = "view"  # page_view() is the stored bytes ([PageStore] in protocols.py)
    in_place = True
    path = None
    direct = None

    def __init__(self, page_bytes: int, *, pin_memory: bool = False):
        self.page_bytes = page_bytes
        self.pin_memory = pin_memory
        self.num_pages = 0
        self.pages_per_chunk = max(1, HOST_CHUNK_BYTES // page_bytes)
        self._chunks: list[torch.Tensor] = []

    @classmethod
    def from_spec(cls, spec, pinned: bool) -> "HostStore":
        return cls(spec.page_bytes, pin_memory=pinned)  # pinned: async H2D/D2H copies

    def describe(self) -> str:
        return "host memory"

    @property
    def nbytes(self) -> int:
        """Bytes the store holds at rest."""
        return sum(c.numel() for c in self._chunks)

    def allocate(self, num_pages: int) -> None:
        """Grows the store to `num_pages` pages; existing pages keep their bytes. On failure
        (out of memory) the old chunks are kept."""
        if num_pages <= self.num_pages:
            return
        per = self.pages_per_chunk
        chunks = list(self._chunks)
        if chunks and chunks[-1].numel() < per * self.page_bytes:  # the partial last chunk grows
            last_pages = min(per, num_pages - (len(chunks) - 1) * per)
            grown = torch.empty(last_pages * self.page_bytes, dtype=torch.uint8, pin_memory=self.pin_memory)
            grown[: chunks[-1].numel()].copy_(chunks[-1])
            chunks[-1] = grown
        while len(chunks) * per < num_pages:
            pages = min(per, num_pages - len(chunks) * per)
            chunks.append(torch.empty(pages * self.page_bytes, dtype=torch.uint8, pin_memory=self.pin_memory))
        self._chunks, self.num_pages = chunks, num_pages

    def page_view(self, page: int) -> torch.Tensor:
        chunk, first = divmod(page, self.pages_per_chunk)
        return self._chunks[chunk][first * self.page_bytes:(first + 1) * self.page_bytes]

    def read(self, page: int, buf: torch.Tensor) -> concurrent.futures.Future:
        buf.copy_(self.page_view(page))
        return done_future()

    def write(self, page: int, buf: torch.Tensor) -> concurrent.futures.Future:
        self.page_view(page).copy_(buf)
        return done_future()

    def commit(self, pages) -> None:
        """Writes land in place: nothing to switch."""

    def check(self) -> None:
        """Host memory cannot go missing between steps."""

    def take_io_seconds(self) -> tuple[float, float]:
        """Copies run on the caller's thread: no IO thread time to report."""
        return 0.0, 0.0

    def close(self) -> None:
        self._chunks = []
        self.num_pages = 0
