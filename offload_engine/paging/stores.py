"""Page stores: where optimizer state rests between steps.

Every store moves whole pages (``page_bytes``) between its storage and a caller's buffer:
``read(page, buf)`` and ``write(page, buf)`` return a Future to wait on, ``commit(pages)``
makes the pages written in a step the current ones. A store whose ``in_place`` is true also
hands out ``page_view(page)``: the CPU executor then updates the stored bytes directly.

HostStore keeps all pages in one host arena (pinned when a GPU executor will copy from it).
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


def done_future(result=None) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(result)
    return future


class HostStore:
    """All pages in one host-memory arena; the CPU executor updates them in place."""

    kind = "cpu"
    in_place = True

    def __init__(self, page_bytes: int, *, pin_memory: bool = False):
        self.page_bytes = page_bytes
        self.pin_memory = pin_memory
        self.num_pages = 0
        self._arena = torch.empty(0, dtype=torch.uint8)

    def describe(self) -> str:
        return "host memory"

    @property
    def nbytes(self) -> int:
        """Bytes the store holds at rest."""
        return self._arena.numel()

    def allocate(self, num_pages: int) -> None:
        """Grows the arena to `num_pages` pages; existing pages keep their bytes. On failure
        (out of memory) the old arena is kept."""
        if num_pages <= self.num_pages:
            return
        arena = torch.empty(num_pages * self.page_bytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        arena[: self._arena.numel()].copy_(self._arena)
        self._arena, self.num_pages = arena, num_pages

    def page_view(self, page: int) -> torch.Tensor:
        return self._arena[page * self.page_bytes:(page + 1) * self.page_bytes]

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

    def close(self) -> None:
        self._arena = torch.empty(0, dtype=torch.uint8)
        self.num_pages = 0
