"""Page table: where each param's optimizer state lives in fixed-size pages.

A page is ``page_bytes`` of state (the unit a store moves and a pool slot holds). Params are
laid out group by group, in param order; a param may span pages and a page may hold many small
params. The piece of one param inside one page is a Segment: elements [start, start + length)
of the flattened param, with each of its state arrays (fp32 moments, or codes and absmax of a
block-quantized moment) at its own 64-byte-aligned offset inside the page.

Segments start at a multiple of the format's alignment unit: 64 elements for fp32 state (a
whole number of SIMD vectors, and 16-byte aligned param slices for every param dtype), the
quantization block for 8-/4-bit state. So a segment is exactly the blocks it covers, and the
kernels give the same bits on a segment as on the whole tensor.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..quant import FORMATS

ARRAY_ALIGN = 64          # bytes: each state array of a segment starts on a cache line
PAGE_ALIGN = 4096         # bytes: page sizes are whole filesystem blocks (direct IO needs it)
FP32_UNIT = 64            # elements: segment granularity for fp32 state


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


@dataclasses.dataclass(frozen=True)
class StateFormat:
    """How the state of one param is stored: fp32 moments, or block-quantized ones."""

    name: str                 # "fp32" | "int8" | "int4"
    moments: tuple            # ("exp_avg", "exp_avg_sq"), or ("exp_avg",) for Lion
    block: int = 0            # quantization block (elements); 0 for fp32
    master: bool = False      # an fp32 copy of the param (for bf16/fp16 params) is paged with the state

    def __post_init__(self):
        if self.name != "fp32" and self.name not in FORMATS:
            raise ValueError(f"unknown state format {self.name!r}")

    @property
    def unit(self) -> int:
        """Segments start at multiples of this many elements."""
        return FP32_UNIT if self.name == "fp32" else self.block

    def arrays(self, numel: int) -> list:
        """(key, bytes, dtype) of each state array for `numel` elements, in page order."""
        master = [("master", numel * 4, torch.float32)] if self.master else []
        if self.name == "fp32":
            return master + [(m, numel * 4, torch.float32) for m in self.moments]
        f = FORMATS[self.name]
        codes = [(f"{m}_codes", f.code_bytes(numel, self.block), torch.uint8) for m in self.moments]
        absmax = [(f"{m}_absmax", -(-numel // self.block) * 4, torch.float32) for m in self.moments]
        return master + codes + absmax

    def nbytes(self, numel: int) -> int:
        """Bytes a segment of `numel` elements takes in a page (arrays padded to ARRAY_ALIGN)."""
        return sum(_round_up(b, ARRAY_ALIGN) for _, b, _ in self.arrays(numel))

    def logical_bytes(self, numel: int) -> int:
        """Bytes of state proper (no alignment padding): what the format costs per param."""
        return sum(b for _, b, _ in self.arrays(numel))


@dataclasses.dataclass(frozen=True)
class Segment:
    key: int                  # the param's index in the optimizer's flat param order
    page: int                 # the page holding it
    group: int                # its param group
    start: int                # first element of the flattened param
    length: int               # elements
    fmt: StateFormat
    offset: int               # byte offset of the segment inside its page
    arrays: tuple             # ((key, offset in page, bytes, dtype), ...)

    def views(self, page_buf: torch.Tensor) -> dict:
        """The segment's state arrays as typed views into a page buffer (uint8, page_bytes)."""
        return {name: page_buf[off:off + nb].view(dtype) for name, off, nb, dtype in self.arrays}


@dataclasses.dataclass
class Page:
    index: int
    group: int
    used: int = 0             # bytes of the page taken by segments
    segments: list = dataclasses.field(default_factory=list)


class PageTable:
    """This optimizer's state laid out in pages of `page_bytes`; groups are appended as they
    are first laid out (a group added later gets pages after the existing ones, so the pages
    already stored keep their index)."""

    def __init__(self, page_bytes: int):
        if page_bytes <= 0 or page_bytes % PAGE_ALIGN:
            raise ValueError(f"page_bytes must be a positive multiple of {PAGE_ALIGN}, got {page_bytes}")
        self.page_bytes = page_bytes
        self.pages: list[Page] = []
        self.segments_of: dict[int, list[Segment]] = {}   # param key -> its segments, in element order
        self.numel_of: dict[int, int] = {}
        self.fmt_of: dict[int, StateFormat] = {}

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    def add_group(self, group: int, entries) -> list[int]:
        """Lays out the params of one group; `entries` is ``[(key, numel, StateFormat), ...]``.
        Returns the indices of the new pages. Raises ValueError, changing nothing, when one
        alignment unit of some param does not fit in an empty page."""
        for _key, numel, fmt in entries:
            unit_bytes = fmt.nbytes(min(fmt.unit, max(numel, 1)))
            if unit_bytes > self.page_bytes:
                raise ValueError(
                    f"page_size_mb is too small: a page of {self.page_bytes} bytes cannot hold one {fmt.name} unit "
                    f"({min(fmt.unit, numel)} elements, {unit_bytes} bytes of state); use at least "
                    f"{_round_up(unit_bytes, PAGE_ALIGN) / 2**20:.4f} MB")
        first = len(self.pages)
        page = None
        for key, numel, fmt in entries:
            if key in self.segments_of:
                raise ValueError(f"param {key} is already laid out")
            self.segments_of[key], self.numel_of[key], self.fmt_of[key] = [], numel, fmt
            start = 0
            while start < numel:  # an empty param has no state and no segment
                if page is None:
                    page = self._new_page(group)
                take = self._fit(fmt, numel - start, self.page_bytes - page.used)
                if take == 0:
                    page = None  # full: continue on a fresh page
                    continue
                self._place(page, key, group, start, take, fmt)
                start += take
        return list(range(first, len(self.pages)))

    def _new_page(self, group: int) -> Page:
        page = Page(index=len(self.pages), group=group)
        self.pages.append(page)
        return page

    @staticmethod
    def _fit(fmt: StateFormat, remaining: int, free: int) -> int:
        """The most elements of `remaining` that fit in `free` bytes: all of them, or a whole
        number of alignment units."""
        if fmt.nbytes(remaining) <= free:
            return remaining
        lo, hi = 0, remaining // fmt.unit  # nbytes is monotone in the element count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fmt.nbytes(mid * fmt.unit) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo * fmt.unit

    def _place(self, page: Page, key: int, group: int, start: int, length: int, fmt: StateFormat):
        offset = page.used
        arrays, at = [], offset
        for name, nbytes, dtype in fmt.arrays(length):
            arrays.append((name, at, nbytes, dtype))
            at += _round_up(nbytes, ARRAY_ALIGN)
        seg = Segment(key=key, page=page.index, group=group, start=start, length=length, fmt=fmt, offset=offset,
                      arrays=tuple(arrays))
        page.segments.append(seg)
        page.used = at
        self.segments_of[key].append(seg)

    def pages_of(self, key: int) -> list[int]:
        """Indices of the pages holding param `key` (ascending)."""
        return sorted({seg.page for seg in self.segments_of[key]})

    def state_bytes(self) -> int:
        """Bytes of state proper over all params (what the formats cost, without padding)."""
        return sum(self.fmt_of[k].logical_bytes(n) for k, n in self.numel_of.items())


def page_bytes_from_mb(page_size_mb) -> int:
    """The page size in bytes for a `page_size_mb` option, rounded up to whole 4 KiB blocks."""
    if isinstance(page_size_mb, bool) or not isinstance(page_size_mb, (int, float)) or not math.isfinite(page_size_mb) \
            or page_size_mb <= 0:
        raise ValueError(f"page_size_mb must be a positive number of megabytes (e.g. 16 or 0.25), got {page_size_mb!r}")
    return _round_up(max(1, int(math.ceil(page_size_mb * 2**20))), PAGE_ALIGN)
