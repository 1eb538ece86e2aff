"""Code maps (sorted float32 tables of the values a code stands for) and the lookup table that
lets a kernel find the nearest code without searching.

The dynamic map is the format of bitsandbytes' 8-bit optimizers (also used by torchao): for
each decade 10^-(E-1) .. 10^0 it holds the midpoints of an even split of [0.1, 1], scaled to
the decade, doubling in count per decade; signed maps hold the negatives too; 0 and 1 are
always present. The float32 arithmetic below reproduces those tables exactly
(tests/test_quant_codec.py pins them).
"""
from __future__ import annotations

import dataclasses

import torch


def dynamic_map(signed: bool, exponent_bits: int, total_bits: int) -> torch.Tensor:
    """The sorted 2^total_bits-entry dynamic map (float32)."""
    magnitude_bits = total_bits - 1
    values: list[float] = []
    for decade in range(exponent_bits):
        # Per decade: 2^decade fractions when signed (half the codes go to negatives), twice that unsigned.
        count = 2 ** (decade + magnitude_bits - exponent_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        centers = (edges[:-1] + edges[1:]) / 2.0
        scaled = centers * (10.0 ** (decade - (exponent_bits - 1)))
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    extra = 2 ** (magnitude_bits - exponent_bits) - 1  # codes left over when fewer exponent bits are used
    if extra > 0:
        edges = torch.linspace(0.1, 1.0, extra + 1, dtype=torch.float32)
        centers = (edges[:-1] + edges[1:]) / 2.0
        scaled = centers * (10.0 ** 0)
        values += scaled.tolist() + ((-scaled).tolist() if signed else [])
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    if len(values) != 2 ** total_bits:
        raise ValueError(f"dynamic_map: {len(values)} values do not fit {total_bits} bits")
    return torch.tensor(sorted(values), dtype=torch.float32)


def linear_unsigned_map(total_bits: int) -> torch.Tensor:
    """k / 2^bits for k = 1 .. 2^bits (no zero): the 4-bit second-moment map (torchao AdamW4bit);
    leaving out zero keeps every dequantized v > 0."""
    n = 2 ** total_bits
    return torch.linspace(0.0, 1.0, n + 1, dtype=torch.float32)[1:].contiguous()


def midpoints(code_map: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between neighbouring codes, in float32, padded with +inf so that
    ``mid[c]`` exists for every code c. A value's code is the number of thresholds below it."""
    mid = (code_map[:-1] + code_map[1:]) / 2.0
    return torch.cat([mid, torch.tensor([float("inf")])]).contiguous()


@dataclasses.dataclass(frozen=True)
class CodeLookup:
    """Nearest-code search without a search: ``key(x)`` takes x's sign, its float32 exponent
    (clamped below at ``min_exponent``) and the top ``mantissa_bits`` of its mantissa;
    ``candidate[key]`` is the code of the smallest value with that key; the code of x is then
    ``candidate + (x > mid[candidate])``. Exact because each key's range of floats holds at
    most one threshold (checked when the table is built).

    ``packed[key]`` holds ``candidate << 24 | offset``, where offset locates that threshold
    inside the bucket (its magnitude bits minus the bucket's first), so a kernel decides with
    one table read: the offset of x is simply its mantissa bits below the top ones, and x lies
    above the threshold when that is larger (positive x) or smaller (negative x). A bucket
    without a threshold gets an offset nothing passes (0xFFFFFF positive, 0 negative)."""

    candidate: torch.Tensor  # uint8, indexed by key
    packed: torch.Tensor  # int32, indexed by key
    min_exponent: int  # biased float32 exponent of the smallest non-tiny bucket
    mantissa_bits: int
    keys_per_sign: int


def _key_bits_ranges(min_exponent: int, mantissa_bits: int):
    """For each magnitude key, the half-open range [lo, hi) of float32 bit patterns it covers."""
    shift = 23 - mantissa_bits
    ranges = [(0, min_exponent << 23)]  # key 0: zero and everything below 2^(min_exponent-127)
    for e in range(min_exponent, 128):
        for top in range(1 << mantissa_bits):
            lo = (e << 23) | (top << shift)
            ranges.append((lo, lo + (1 << shift)))
    return ranges


def build_lookup(code_map: torch.Tensor) -> CodeLookup:
    """Builds the smallest table (fewest mantissa bits) that is exact for this map, for values
    in [-1, 1] (block-normalised state)."""
    mid = midpoints(code_map)
    finite_mid = mid[:-1].double()
    positive = finite_mid[finite_mid > 0]
    negative = -finite_mid[finite_mid < 0]
    smallest = float(torch.cat([positive, negative]).min()) if len(positive) + len(negative) else 1.0
    min_exponent = 127
    while min_exponent > 1 and 2.0 ** (min_exponent - 127) > smallest:
        min_exponent -= 1  # below 2^(min_exponent-127) there is no threshold: one "tiny" bucket
    for mantissa_bits in range(0, 12):
        table, packed, exact = _try_lookup(mid, min_exponent, mantissa_bits)
        if exact:
            return CodeLookup(table, packed, min_exponent, mantissa_bits, len(table) // 2)
    raise ValueError("build_lookup: no exact table with up to 11 mantissa bits")


def _try_lookup(mid: torch.Tensor, min_exponent: int, mantissa_bits: int):
    ranges = torch.tensor(_key_bits_ranges(min_exponent, mantissa_bits), dtype=torch.int64)
    last = ranges[:, 1] - 1
    as_float = lambda bits: bits.to(torch.int32).view(torch.float32)  # noqa: E731
    # Positive keys cover [float(lo), float(hi-1)]; negative keys cover [-float(hi-1), -float(lo)].
    pos_lo, pos_hi = as_float(ranges[:, 0]), as_float(last)
    neg_lo, neg_hi = -pos_hi, -pos_lo
    lo = torch.cat([pos_lo, neg_lo])
    hi = torch.cat([pos_hi, neg_hi])
    candidate = torch.searchsorted(mid, lo, right=False)   # thresholds strictly below lo
    through_hi = torch.searchsorted(mid, hi, right=False)  # thresholds strictly below hi
    exact = bool((through_hi - candidate <= 1).all())
    # Offset of the bucket's threshold (if any) from the bucket's first magnitude pattern.
    keys = len(ranges)
    has_threshold = through_hi > candidate
    threshold = mid[candidate.clamp(max=len(mid) - 1)]
    magnitude = threshold.abs().contiguous().view(torch.int32).to(torch.int64)
    start = torch.cat([ranges[:, 0], ranges[:, 0]])
    start[0] = start[keys] = 0  # the tiny bucket: offsets are taken as 0 there (it has no threshold)
    offset = (magnitude - start).clamp(0, 0xFFFFFF)
    none = torch.cat([torch.full((keys,), 0xFFFFFF), torch.zeros(keys, dtype=torch.int64)])
    offset = torch.where(has_threshold, offset, none)
    packed = ((candidate.to(torch.int64) << 24) | offset).to(torch.int32)  # wraps to int32 bits
    return candidate.to(torch.uint8), packed, exact


def _saturated_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 bits as int64, with exponents above 127 (|x| >= 2, inf, NaN) saturated to the
    largest value below 2 of the same sign, as the kernels do: keys stay inside the table."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    big = ((bits >> 23) & 0xFF) > 127
    return torch.where(big, (bits & 0x80000000) | (127 << 23) | 0x7FFFFF, bits)


def lookup_key(x: torch.Tensor, lookup: CodeLookup) -> torch.Tensor:
    """The key of each float32 in x (as the kernels compute it), int64."""
    bits = _saturated_bits(x)
    sign = bits >> 31
    exponent = (bits >> 23) & 0xFF
    top = (bits >> (23 - lookup.mantissa_bits)) & ((1 << lookup.mantissa_bits) - 1)
    magnitude_key = torch.where(exponent < lookup.min_exponent, torch.zeros_like(exponent),
                                1 + ((exponent - lookup.min_exponent) << lookup.mantissa_bits) + top)
    return sign * lookup.keys_per_sign + magnitude_key


def lookup_codes(x: torch.Tensor, lookup: CodeLookup) -> torch.Tensor:
    """Codes of float32 x computed exactly as the kernels do, from ``lookup.packed`` alone."""
    entry = lookup.packed[lookup_key(x, lookup)].to(torch.int64) & 0xFFFFFFFF
    candidate, offset = entry >> 24, entry & 0xFFFFFF
    bits = _saturated_bits(x)
    exponent = (bits >> 23) & 0xFF
    low = bits & ((1 << (23 - lookup.mantissa_bits)) - 1)
    low = torch.where(exponent < lookup.min_exponent, torch.zeros_like(low), low)
    negative = (bits >> 31) == 1
    up = torch.where(negative, low < offset, low > offset)
    return candidate + up.long()
