"""The block-quantized state codec: maps compatible with bitsandbytes/torchao, round-trip
error bounds, the exact code lookup, and packing."""
import hashlib

import pytest
import torch

from offload_engine.quant import FORMATS, codec, maps

# sha256 of the float32 maps, checked against bitsandbytes' create_dynamic_map and torchao's
# AdamW4bit maps when those are installed (test below); pinned so CI checks without them.
MAP_SHA256 = {("int8", True): "e732639a65f497b4", ("int8", False): "305f002cc11278fb",
              ("int4", True): "721d11e3711326d4", ("int4", False): "0aeb670b8c9b6b0f"}


@pytest.mark.parametrize("fmt,signed", list(MAP_SHA256))
def test_maps_are_pinned(fmt, signed):
    m = FORMATS[fmt].code_map(signed)
    assert hashlib.sha256(m.numpy().tobytes()).hexdigest()[:16] == MAP_SHA256[(fmt, signed)]
    assert len(m) == 2 ** FORMATS[fmt].bits and torch.all(m[1:] >= m[:-1]) and m.max() == 1.0


def test_maps_equal_bitsandbytes_and_torchao():
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(maps.dynamic_map(True, 7, 8), bnb.create_dynamic_map(signed=True))
    assert torch.equal(maps.dynamic_map(False, 7, 8), bnb.create_dynamic_map(signed=False))
    t4 = pytest.importorskip("torchao.optim.subclass_4bit")
    assert torch.equal(maps.dynamic_map(True, 3, 4), torch.as_tensor(t4.get_qmap_signed(), dtype=torch.float32))
    assert torch.equal(maps.linear_unsigned_map(4), torch.as_tensor(t4.get_qmap_unsigned(), dtype=torch.float32))


@pytest.mark.parametrize("fmt,signed", list(MAP_SHA256))
def test_lookup_equals_search(fmt, signed):
    """The kernels' table lookup gives exactly the reference's code, at every threshold,
    one ulp either side of it, every map value, signed zeros and random values."""
    code_map = FORMATS[fmt].code_map(signed)
    lookup = maps.build_lookup(code_map)
    mid = maps.midpoints(code_map)
    thresholds = mid[:-1]
    x = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1, thresholds,
                   torch.nextafter(thresholds, torch.tensor(2.0)), torch.nextafter(thresholds, torch.tensor(-2.0)),
                   code_map, -code_map, torch.tensor([0.0, -0.0, 1e-30, -1e-30])]).clamp(-1, 1)
    expected = torch.searchsorted(mid, x, right=False)
    # Beyond [-1, 1]: |x| >= 2, inf and NaN saturate to the extreme code of their sign.
    wild = torch.tensor([1.5, -1.5, 2.0, -2.0, 3e38, -3e38, float("inf"), -float("inf"), float("nan"),
                         -float("nan")])
    top = 2 ** FORMATS[fmt].bits - 1
    wild_expected = torch.tensor([torch.searchsorted(mid, torch.tensor(1.5)).item(),
                                  torch.searchsorted(mid, torch.tensor(-1.5)).item(), top, 0, top, 0, top, 0, top, 0])
    assert torch.equal(maps.lookup_codes(wild, lookup), wild_expected)
    candidate = lookup.candidate[maps.lookup_key(x, lookup)].long()
    assert torch.equal(candidate + (x > mid[candidate]).long(), expected)
    assert torch.equal(maps.lookup_codes(x, lookup), expected)  # the single-read form the kernels use


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4097])
@pytest.mark.parametrize("block", [64, 256, 4096])
def test_round_trip_error_bound(fmt, n, block):
    """|x - deq(q(x))| is at most the map's worst nearest-rounding error over [-1, 1] (signed)
    or [0, 1] (unsigned) -- half its widest gap, or the distance from the interval's low end to the lowest value (a
    signed map holds no -1; the 4-bit unsigned map no 0) -- times the block's absmax; each code is the nearest value."""
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(n + block)
    for signed in (True, False):
        x = torch.randn(n, generator=gen) * 1e-2
        x = x if signed else x.abs()
        codes, absmax = codec.quantize_blockwise(x, f, signed, block)
        assert codes.numel() == f.code_bytes(n, block) and absmax.numel() == -(-n // block)
        back = codec.dequantize_blockwise(codes, absmax, f, signed, block, n)
        code_map = f.code_map(signed)
        worst = max(float((code_map[1:] - code_map[:-1]).max()) / 2, float(code_map.min() + 1) if signed else float(code_map.min()))
        per_elem_absmax = absmax.repeat_interleave(block)[:n]
        assert torch.all((back - x).abs() <= worst * per_elem_absmax * (1 + 1e-5) + 1e-12)
        # nearest: no other map value is strictly closer
        normalised = x / per_elem_absmax.clamp_min(1e-30)
        dist = (code_map[None, :] - normalised[:, None]).abs()
        chosen = codec.unpack(codes, f.bits)[:n].long()
        assert torch.all(dist.gather(1, chosen[:, None]).squeeze(1) <= dist.min(dim=1).values * (1 + 1e-6) + 1e-12)


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (512,), dtype=torch.uint8)
    packed = codec.pack(codes, 4)
    assert packed.numel() == 256 and torch.equal(codec.unpack(packed, 4), codes)
    assert packed[0] == codes[0] | (codes[1] << 4)  # element 2k in the low nibble


def test_zero_block_round_trips_to_zero():
    for fmt in FORMATS.values():
        codes, absmax = codec.quantize_blockwise(torch.zeros(300), fmt, True, 128)
        assert torch.equal(codec.dequantize_blockwise(codes, absmax, fmt, True, 128, 300), torch.zeros(300))


@pytest.mark.parametrize("block", [0, 32, 100, 8192])
def test_bad_block_size_is_refused(block):
    with pytest.raises(ValueError, match="block_size must be a power of two from 64 to 4096"):
        codec.check_block(block)


@pytest.mark.parametrize("fmt,signed", list(MAP_SHA256))
@pytest.mark.parametrize("n,block", [(1, 64), (255, 256), (256, 256), (257, 256), (4097, 256), (100_003, 2048)])
def test_encode_decoded_gets_back_the_codes_that_decoded_to_the_values(fmt, signed, n, block):
    """A state decoded to fp32 (as a sharded state_dict holds it) and encoded into the same
    blocks gets back its codes, and an absmax that decodes them to the same values bit for bit
    (the saved one, or where a block's few elements cannot tell, a neighbouring float), also
    for blocks whose largest magnitude is negative (the signed maps have no -1.0: plain
    re-quantization shrinks their absmax, which this test checks happens in the data)."""
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(n + block)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3 * 1e-3
    x = x if signed else x * x
    if signed:
        x[0] = -x.abs().max() * 1.5  # the first block's largest magnitude is negative
    codes, absmax = codec.quantize_blockwise(x, f, signed, block)
    decoded = codec.dequantize_blockwise(codes, absmax, f, signed, block, n)
    got_codes, got_absmax = codec.encode_decoded(decoded, f, signed, block)
    assert torch.equal(got_codes, codes)
    assert (got_absmax != absmax).sum() <= (1 if n < 8 else 0)
    again = codec.dequantize_blockwise(got_codes, got_absmax, f, signed, block, n)
    assert torch.equal(again.view(torch.int32), decoded.view(torch.int32))
    plain_codes, plain_absmax = codec.quantize_blockwise(decoded, f, signed, block)
    assert torch.equal(plain_absmax, absmax) != signed  # what encode_decoded is for


@pytest.mark.parametrize("fmt,signed", list(MAP_SHA256))
def test_encode_decoded_of_values_no_codes_decode_to_is_the_plain_quantization(fmt, signed):
    """Blocks of values that are not a decoded state (random fp32, 256 per block) are quantized
    as quantize_blockwise does."""
    f = FORMATS[fmt]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(7))
    x = x if signed else x * x
    for got, want in zip(codec.encode_decoded(x, f, signed, 256), codec.quantize_blockwise(x, f, signed, 256)):
        assert torch.equal(got, want)
