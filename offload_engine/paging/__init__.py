"""Paging core: page table (layout.py), page stores (stores.py, nvme_store.py), the slot
pool (pool.py) and the per-step pipeline (scheduler.py). ../shared/DESIGN.md: layers."""
from .layout import PageTable, Segment, StateFormat, page_bytes_from_mb
from .nvme_store import NvmeStore
from .pool import SlotPool
from .scheduler import PageScheduler, StepStats
from .stores import HostStore, PageIOError, PagingError

__all__ = ["PageTable", "Segment", "StateFormat", "page_bytes_from_mb", "HostStore", "NvmeStore", "SlotPool",
           "PageScheduler", "StepStats", "PagingError", "PageIOError"]
