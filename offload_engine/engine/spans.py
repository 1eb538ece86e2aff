"""Slices of params or grads, packed back to back into flat buffers for the data-parallel
collectives and unpacked again. A span is a list of (tensor, start, end): elements
[start, end) of the tensor's flat view, in order."""
from __future__ import annotations

import torch


def pack(span, flat: torch.Tensor) -> None:
    """The slices of `span` ((tensor, start, end): of a param or a grad, in order) into
    `flat`, back to back."""
    offset = 0
    for p, a, b in span:
        flat[offset:offset + b - a] = p.view(-1)[a:b]
        offset += b - a


def sub_span(span, lo: int, hi: int) -> list:
    """The part of `span` that lands at [lo, hi) once its slices are packed back to back."""
    out, offset = [], 0
    for p, a, b in span:
        n = b - a
        x, y = max(lo, offset), min(hi, offset + n)
        if x < y:
            out.append((p, a + x - offset, a + y - offset))
        offset += n
    return out


def add_into(span, flat: torch.Tensor) -> None:
    """Adds `flat` (the slices of `span`, packed back to back) into the slices themselves."""
    offset = 0
    for t, a, b in span:
        t.view(-1)[a:b] += flat[offset:offset + b - a]
        offset += b - a


def unpack(flat: torch.Tensor, span) -> None:
    """`flat` back into the slices of `span` (the reverse of pack)."""
    offset = 0
    for p, a, b in span:
        p.view(-1)[a:b] = flat[offset:offset + b - a]
        offset += b - a
