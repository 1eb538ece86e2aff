"""The seams of the paging layer: what a page store and a page pipeline promise the Pager.

A store is where pages rest between steps; a pipeline moves one step's pages from the store to
the executor's update and back. Any class with these members plugs in: the Pager never asks
which class it holds. How a pipeline reaches a store's bytes is the store's ``access``:

  "view"     page_view(page) is the stored bytes in host memory (HostStore): the CPU executor
             updates them in place, the CUDA executor copies from them (pinned) to device slots
  "io"       read/write through caller buffers only, asynchronously (NvmeStore): pages move
             through a slot pool
  "managed"  page_view(page) is CUDA managed memory, prefetch(page)/evict(page) migrate it
             (ManagedStore): the CUDA executor updates it in place
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from .scheduler import StepStats

Update = Callable[[int, torch.Tensor], None]  # update(page, buffer holding the page's bytes)


@runtime_checkable
class PageStore(Protocol):
    kind: str           # the config's name for it: "cpu", "nvme", "managed"
    access: str         # "view" | "io" | "managed" (module docstring)
    in_place: bool      # access != "io": the update can run on the stored bytes
    page_bytes: int
    num_pages: int
    path: Optional[str]      # the file it keeps, if any
    direct: Optional[bool]   # whether that file is read with direct IO

    @property
    def nbytes(self) -> int:
        """Bytes the store holds at rest (RAM, managed memory or file)."""

    def describe(self) -> str:
        """Where the pages are, for error messages (a path for a file store)."""

    def allocate(self, num_pages: int) -> None:
        """Grows to `num_pages` pages, keeping the existing ones; raises PageIOError (out of
        space) before anything changes."""

    def read(self, page: int, buf: torch.Tensor) -> concurrent.futures.Future:
        """Copies the page's current bytes into `buf`."""

    def write(self, page: int, buf: torch.Tensor) -> concurrent.futures.Future:
        """Stores `buf` as the page's next bytes (current after commit())."""

    def commit(self, pages: Sequence[int]) -> None:
        """Makes the pages written since the last commit the current ones, together."""

    def check(self) -> None:
        """Raises PagingError if the stored pages went missing (a deleted file)."""

    def take_io_seconds(self) -> tuple[float, float]:
        """Seconds its IO threads spent reading and writing since the last call."""

    def close(self) -> None:
        """Releases the pages (deletes a file)."""


@runtime_checkable
class PagePipeline(Protocol):
    """One step at a time: start(update), feed(pages) any number of times in page order as
    their grads become final, then finish() (or abandon()). pages_updated counts the pages of
    the step in progress (or the last one) whose update ran (or, on a GPU, was enqueued)."""

    pages_updated: int

    @property
    def nbytes(self) -> int:
        """GPU bytes it holds (device slots)."""

    def start(self, update: Update) -> None: ...

    def feed(self, pages: Sequence[int], after: Optional[object] = None) -> None:
        """`after`: for a CUDA pipeline, an event the updates wait for (the pages' grads)."""

    def finish(self) -> StepStats: ...

    def abandon(self) -> None:
        """Drops the open step: nothing more is stored, nothing is committed."""
