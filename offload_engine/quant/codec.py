"""Block formats and the reference blockwise codec: the definition every kernel matches.

A tensor of n elements is split into blocks of ``block`` elements (the last one partial).
Each block stores one float32 absmax (max |x|, NaN ignored) and one code per element: code =
the number of the map's thresholds (midpoints between neighbouring map values) strictly
below x * (1 / absmax) (so the nearest map value, ties going to the lower code); value =
map[code] * absmax. A block whose absmax is zero or subnormal is flushed (the factor is 0,
since 1 / absmax would overflow); a non-finite scaled value takes the extreme code of its
sign (+inf, +NaN: the highest; -inf, -NaN: the lowest).
4-bit codes are packed two per byte, element 2k in the low nibble.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import maps


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    name: str
    bits: int
    default_block: int
    signed_map: tuple  # for exp_avg (and Lion's momentum)
    unsigned_map: tuple  # for exp_avg_sq

    def code_map(self, signed: bool) -> torch.Tensor:
        return torch.tensor(self.signed_map if signed else self.unsigned_map, dtype=torch.float32)

    def code_bytes(self, numel: int, block: int) -> int:
        """Bytes of codes for numel elements, padded to whole blocks."""
        padded = -(-numel // block) * block
        return padded * self.bits // 8


def _t(x: torch.Tensor) -> tuple:
    return tuple(x.tolist())


FORMATS = {
    "int8": BlockFormat("int8", 8, 256, _t(maps.dynamic_map(True, 7, 8)), _t(maps.dynamic_map(False, 7, 8))),
    "int4": BlockFormat("int4", 4, 128, _t(maps.dynamic_map(True, 3, 4)), _t(maps.linear_unsigned_map(4))),
}
BLOCK_SIZES = tuple(2 ** k for k in range(6, 13))  # 64 .. 4096


def check_block(block: int) -> int:
    if block not in BLOCK_SIZES:
        raise ValueError(f"block_size must be a power of two from 64 to 4096, got {block!r}")
    return block


@functools.lru_cache(maxsize=None)
def _midpoints(fmt_name: str, signed: bool) -> torch.Tensor:
    return maps.midpoints(FORMATS[fmt_name].code_map(signed))


def quantize_blockwise(x: torch.Tensor, fmt: BlockFormat, signed: bool, block: int,
                       absmax: torch.Tensor | None = None):
    """Reference quantization of float32 x: (codes uint8 [padded, packed], absmax float32).
    ``absmax`` (one per block) replaces each block's max |x| as its scale (encode_decoded)."""
    n = x.numel()
    pad = -n % block
    xb = torch.nn.functional.pad(x.reshape(-1).to(torch.float32), (0, pad)).view(-1, block)
    if absmax is None:
        absmax = torch.where(torch.isnan(xb), torch.zeros_like(xb), xb.abs()).amax(dim=1)
    inv = torch.where(absmax >= 2.0 ** -126, 1.0 / absmax, torch.zeros_like(absmax))
    normalised = xb * inv[:, None]
    normalised = torch.where(torch.isnan(normalised), torch.full_like(normalised, float("inf")).copysign(normalised),
                             normalised)
    thresholds = _midpoints(fmt.name, signed).to(normalised.device)  # on x's device (CPU or GPU)
    codes = torch.searchsorted(thresholds, normalised.reshape(-1), right=False)
    codes = codes.to(torch.uint8)
    if pad:
        codes[n:] = 0  # padding is never read; keep it deterministic
    return pack(codes, fmt.bits), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, fmt: BlockFormat, signed: bool, block: int,
                         numel: int, code_map: torch.Tensor | None = None) -> torch.Tensor:
    """map[code] * absmax; ``code_map`` overrides the format's map (e.g. one saved in a checkpoint)."""
    code_map = fmt.code_map(signed) if code_map is None else torch.as_tensor(code_map, dtype=torch.float32)
    values = code_map.to(codes.device)[unpack(codes, fmt.bits).long()].view(-1, block)
    return (values * absmax[:, None]).reshape(-1)[:numel]


def encode_decoded(x: torch.Tensor, fmt: BlockFormat, signed: bool, block: int):
    """quantize_blockwise(x), except that each block of x which is some codes' decoded values
    (map[code] * absmax, in these blocks) gets those codes and an absmax that decode to x bit
    for bit. So a state decoded to fp32 (a sharded state_dict) and loaded into the same blocks
    continues exactly.

    The plain quantization finds them when the block's largest magnitude decoded from the map's
    1.0 (its absmax is then that magnitude). When it decoded from the map's most negative value
    m (the signed maps have no -1.0), the absmax was |x| / |m| to within rounding: the
    candidates are that quotient and its float32 neighbours, each kept for the blocks it
    reproduces exactly. Other blocks keep the plain quantization."""
    codes, absmax = quantize_blockwise(x, fmt, signed, block)
    n = x.numel()
    xb = torch.nn.functional.pad(x.reshape(-1).to(torch.float32), (0, -n % block)).view(-1, block)
    real = torch.full((xb.shape[0],), block, device=xb.device)  # elements per block: padding is never decoded
    real[-1] = n - (xb.shape[0] - 1) * block
    code_map = fmt.code_map(signed).to(xb.device)
    done = _decodes_to(codes, absmax, xb, real, code_map, fmt.bits)
    edges = {abs(v) for v in (code_map[0].item(), code_map[-1].item())} - {0.0, 1.0}
    if bool(done.all()) or not edges:
        return codes, absmax
    codes_b = codes.view(absmax.numel(), -1).clone()  # whole blocks: block * bits is a multiple of 8
    absmax = absmax.clone()
    for edge in sorted(edges):
        quotient = absmax / edge
        for a in (quotient, torch.nextafter(quotient, torch.zeros_like(quotient)),
                  torch.nextafter(quotient, torch.full_like(quotient, float("inf")))):
            rows = (~done).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            c, _ = quantize_blockwise(xb[rows].reshape(-1), fmt, signed, block, absmax=a[rows])
            ok = _decodes_to(c, a[rows], xb[rows], real[rows], code_map, fmt.bits)
            codes_b[rows[ok]] = c.view(rows.numel(), -1)[ok]
            absmax[rows[ok]] = a[rows[ok]]
            done[rows[ok]] = True
    if n % block:  # as quantize_blockwise: padding codes are 0
        last = unpack(codes_b[-1], fmt.bits).clone()
        last[n % block:] = 0
        codes_b[-1] = pack(last, fmt.bits)
    return codes_b.view(-1), absmax


def _decodes_to(codes, absmax, xb, real, code_map, bits) -> torch.Tensor:
    """Per block (row of xb): whether codes and absmax decode to the block's first `real`
    elements bit for bit."""
    decoded = code_map[unpack(codes, bits).long()].view(xb.shape) * absmax[:, None]
    padding = torch.arange(xb.shape[1], device=xb.device)[None, :] >= real[:, None]
    return ((decoded.view(torch.int32) == xb.view(torch.int32)) | padding).all(dim=1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    return torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class CodeTablesT:
    """The tensors a kernel needs for one map (see maps.CodeLookup)."""

    map: torch.Tensor
    lut: torch.Tensor  # int32 per key: candidate << 24 | threshold offset (maps.CodeLookup.packed)
    min_exponent: int
    mantissa_bits: int


@functools.lru_cache(maxsize=None)
def code_tables(fmt_name: str, signed: bool) -> CodeTablesT:
    code_map = FORMATS[fmt_name].code_map(signed)
    lookup = maps.build_lookup(code_map)
    return CodeTablesT(code_map, lookup.packed.contiguous(), lookup.min_exponent, lookup.mantissa_bits)
