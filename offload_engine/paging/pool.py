"""SlotPool: the fixed set of page-sized working buffers a paged step moves pages through.

Allocated once, when the optimizer first lays out its state; a step takes and returns slots
and allocates nothing. Slots are 4 KiB aligned (direct IO needs it) and pinned when a GPU
executor copies from them.
"""
from __future__ import annotations

import torch

SLOT_ALIGN = 4096


class SlotPool:
    def __init__(self, num_slots: int, slot_bytes: int, *, pin_memory: bool = False):
        if num_slots < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {num_slots}")
        self.slot_bytes = slot_bytes
        self.pinned = pin_memory
        raw = torch.empty(num_slots * slot_bytes + SLOT_ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
        skip = (-raw.data_ptr()) % SLOT_ALIGN
        self._raw = raw
        self.slots = [raw[skip + i * slot_bytes: skip + (i + 1) * slot_bytes] for i in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        return self._raw.numel()

    @property
    def in_use(self) -> int:
        return len(self.slots) - len(self._free)

    def has_free(self) -> bool:
        return bool(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError("slot pool exhausted (a scheduler bug: it must wait for a write-back first)")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def release_all(self) -> None:
        self._free = list(range(len(self.slots) - 1, -1, -1))
