"""index_offset: a slice of a tensor, updated with index_offset = its start, rounds exactly as
the whole tensor does (the paged optimizers update page segments this way). Every op, every
SIMD path, bf16 and fp16 params with stochastic rounding: params and every state tensor bit
for bit, the reference with the same offset, and an offset that must change the result."""
import pytest
import torch

from offload_engine import kernels, reference
from offload_engine.quant import FORMATS, codec
from conftest import bits

OPS = ["adam", "lion", "adam_blockwise", "lion_blockwise"]
PARAM_DTYPES = [torch.bfloat16, torch.float16]


class Op:
    """One of the four ops with its state: how to build it, slice it for a segment, and run
    the kernel or the reference on (a segment of) it."""

    def __init__(self, kind: str, fmt: str = "int8", block: int = 256):
        self.kind, self.fmt, self.block = kind, fmt, block
        self.blockwise = kind.endswith("blockwise")
        self.lion = kind.startswith("lion")
        # The pager's alignment: whole SIMD vectors for fp32 state, whole blocks otherwise.
        self.unit = block if self.blockwise else 64

    def state(self, n: int, gen: torch.Generator) -> list[torch.Tensor]:
        if not self.blockwise:
            m = torch.randn(n, generator=gen) * 1e-2
            return [m] if self.lion else [m, torch.rand(n, generator=gen) * 1e-4]
        f = FORMATS[self.fmt]
        state = list(codec.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, f, True, self.block))
        if not self.lion:
            state += codec.quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, f, False, self.block)
        return state

    def segment(self, state: list[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
        """Views of the state of elements [start, end) (start on a unit boundary)."""
        if not self.blockwise:
            return [t[start:end] for t in state]
        b0, b1 = start // self.block, -(-end // self.block)
        per_block = self.block * FORMATS[self.fmt].bits // 8  # code bytes per block
        out = []
        for codes, absmax in zip(state[::2], state[1::2]):
            out += [codes[b0 * per_block:b1 * per_block], absmax[b0:b1]]
        return out

    def hyper(self, step: int, **over) -> dict:
        if self.lion:
            kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, stochastic_rounding=True, seed=step * 31 + 5)
        else:
            kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step,
                      stochastic_rounding=True, seed=step * 31 + 5)
        kw.update(over)
        return kw

    def run(self, p, g, state, *, ref=False, **hyper):
        if self.blockwise:
            fmt = FORMATS[self.fmt] if ref else self.fmt
            fn = getattr(reference if ref else kernels, f"{self.kind[:4]}_step_blockwise_")
            fn(p, g, *state, fmt=fmt, block=self.block, **hyper)
        else:
            getattr(reference if ref else kernels, f"{self.kind}_step_")(p, g, *state, **hyper)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (codes are bytes already)."""
    return torch.equal(a, b) if a.dtype == torch.uint8 else torch.equal(bits(a), bits(b))


def _cuts(n: int, unit: int) -> list[int]:
    """Segment starts as the pager makes them: unit multiples of varied lengths, the last
    segment ending in the odd tail."""
    starts = [0, unit, 3 * unit, 4 * unit, 7 * unit]
    return [s for s in starts if s < n] + [n]


def _ops():
    return [Op("adam"), Op("lion"), Op("adam_blockwise", "int8", 256), Op("adam_blockwise", "int4", 64),
            Op("lion_blockwise", "int8", 64), Op("lion_blockwise", "int4", 128)]


@pytest.mark.parametrize("op", _ops(), ids=lambda o: f"{o.kind}-{o.fmt}-{o.block}" if o.blockwise else o.kind)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_slices_with_offset_equal_the_whole_tensor(simd_path, op, param_dtype):
    n = 8 * op.unit + 37  # an odd tail past the last unit
    gen = torch.Generator().manual_seed(n + op.block)
    p_whole = torch.randn(n, generator=gen).to(param_dtype)
    s_whole = op.state(n, gen)
    p_seg, s_seg = p_whole.clone(), [t.clone() for t in s_whole]
    p_ref, s_ref = p_whole.clone(), [t.clone() for t in s_whole]
    cuts = _cuts(n, op.unit)
    assert len(cuts) > 3 and (cuts[-1] - cuts[-2]) % 2 == 1
    for step in range(1, 4):
        g = (torch.randn(n, generator=gen) * 1e-2).to(param_dtype)
        hyper = op.hyper(step)
        op.run(p_whole, g, s_whole, **hyper)
        for start, end in zip(cuts, cuts[1:]):  # views: the segments write into p_seg, s_seg
            op.run(p_seg[start:end], g[start:end], op.segment(s_seg, start, end), index_offset=start, **hyper)
            op.run(p_ref[start:end], g[start:end], op.segment(s_ref, start, end), ref=True, index_offset=start,
                   **hyper)
        where = f"path={simd_path} {op.kind} {param_dtype} step={step}"
        assert torch.equal(bits(p_seg), bits(p_whole)), where
        assert torch.equal(bits(p_ref), bits(p_whole)), f"reference {where}"
        for i, (a, b, c) in enumerate(zip(s_seg, s_ref, s_whole)):
            assert _same(a, c), f"state {i} {where}"
            assert _same(b, c), f"reference state {i} {where}"


@pytest.mark.parametrize("op", _ops()[:3], ids=lambda o: o.kind)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_offset_changes_the_rounding(simd_path, op, param_dtype):
    """The offset is not ignored: the same segment at offset 0 and at its real start rounds
    differently (and the real start is what matches the whole tensor, tested above)."""
    n = 4 * op.unit + 5
    gen = torch.Generator().manual_seed(7)
    p0, s0 = torch.randn(n, generator=gen).to(param_dtype), op.state(n, gen)
    g = (torch.randn(n, generator=gen) * 1e-2).to(param_dtype)
    results = []
    for offset in (0, op.unit, 2 * op.unit):
        p, s = p0.clone(), [t.clone() for t in s0]
        op.run(p, g, s, index_offset=offset, **op.hyper(1))
        results.append(p)
        p_ref, s_ref = p0.clone(), [t.clone() for t in s0]
        op.run(p_ref, g, s_ref, ref=True, index_offset=offset, **op.hyper(1))
        assert torch.equal(bits(p), bits(p_ref)), f"offset {offset}"
    assert not torch.equal(bits(results[0]), bits(results[1]))
    assert not torch.equal(bits(results[1]), bits(results[2]))
    # Nearest-even rounding has no stream: there the offset changes nothing.
    p_a, p_b = p0.clone(), p0.clone()
    op.run(p_a, g, [t.clone() for t in s0], index_offset=0, **op.hyper(1, stochastic_rounding=False))
    op.run(p_b, g, [t.clone() for t in s0], index_offset=op.unit, **op.hyper(1, stochastic_rounding=False))
    assert torch.equal(bits(p_a), bits(p_b))


def _hash(seed: int, index: int) -> int:
    """The stochastic-rounding hash of one element in plain Python (ops/csrc/cpu/simd_scalar.h)."""
    def mix32(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key = mix32((seed & 0xFFFFFFFF) ^ mix32((seed >> 32) + (index >> 32) * 0x9E3779B9))
    return mix32((index & 0xFFFFFFFF) ^ key)


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 3, 2**32 - 40, 3 * 2**32 + 7, 2**62 - 9])
def test_reference_stream_is_the_hash_of_offset_plus_index(offset):
    """reference.random_bits over offset .. offset+n-1, across multiples of 2^32 where the key
    changes (wherever they fall in the tensor)."""
    seed, n = 0xDEADBEEF12345678, 80
    got = reference.random_bits(seed, n, offset).tolist()
    assert got == [_hash(seed, offset + i) for i in range(n)]
    if offset < 1000:
        assert torch.equal(reference.random_bits(seed, n, offset), reference.random_bits(seed, offset + n)[offset:])


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_any_offset_and_the_2_to_32_boundary(simd_path, param_dtype):
    """Offsets need no alignment: vectors whose lanes straddle a multiple of 2^32 (where the
    stream's key changes) take each lane's own key. Slices cut anywhere equal the whole."""
    n = 300
    gen = torch.Generator().manual_seed(11)
    for base in (2**32 - 100, 2**32 - 7, 2**33 - 64, 5):
        p0, g = torch.randn(n, generator=gen).to(param_dtype), (torch.randn(n, generator=gen) * 1e-2).to(param_dtype)
        m0, v0 = torch.randn(n, generator=gen) * 1e-2, torch.rand(n, generator=gen) * 1e-4
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=2, stochastic_rounding=True,
                     seed=base)
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        kernels.adam_step_(p, g, m, v, index_offset=base, **hyper)
        p_ref, m_ref, v_ref = p0.clone(), m0.clone(), v0.clone()
        reference.adam_step_(p_ref, g, m_ref, v_ref, index_offset=base, **hyper)
        assert torch.equal(bits(p), bits(p_ref)), f"{simd_path} base={base}"
        p_seg, m_seg, v_seg = p0.clone(), m0.clone(), v0.clone()
        cuts = [0, 3, 50, 93, 97, 211, n]  # no alignment at all
        for a, b in zip(cuts, cuts[1:]):
            kernels.adam_step_(p_seg[a:b], g[a:b], m_seg[a:b], v_seg[a:b], index_offset=base + a, **hyper)
        assert torch.equal(bits(p_seg), bits(p)), f"{simd_path} base={base} slices"
        assert torch.equal(bits(m_seg), bits(m)) and torch.equal(bits(v_seg), bits(v))


@pytest.mark.parametrize("op", _ops()[:4], ids=lambda o: o.kind)
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "fallback"])
def test_negative_offset_is_refused_by_name_and_writes_nothing(native, monkeypatch, op, use_native):
    if not use_native:  # kernels.* as without a native build: the checked reference
        monkeypatch.setattr(kernels, "_native_for", lambda param: False)
    n = 100
    gen = torch.Generator().manual_seed(3)
    p, g, s = torch.randn(n, generator=gen).to(torch.bfloat16), torch.randn(n, generator=gen), op.state(n, gen)
    before = [t.clone() for t in (p, *s)]
    with pytest.raises(ValueError, match="index_offset must be >= 0"):
        op.run(p, g.to(torch.bfloat16), s, index_offset=-1, **op.hyper(1))
    for a, b in zip((p, *s), before):
        assert _same(a, b)
    with pytest.raises(ValueError, match="index_offset must be >= 0"):
        reference.random_bits(1, 4, -1)


@pytest.mark.parametrize("op", _ops()[:4], ids=lambda o: o.kind)
def test_fallback_passes_the_offset_to_the_reference(native, monkeypatch, op):
    """kernels.* without the native op (the reference fallback) rounds with the offset too."""
    n = 3 * op.unit + 9
    gen = torch.Generator().manual_seed(5)
    p0, s0 = torch.randn(n, generator=gen).to(torch.bfloat16), op.state(n, gen)
    g = (torch.randn(n, generator=gen) * 1e-2).to(torch.bfloat16)
    p_native, p_fallback = p0.clone(), p0.clone()
    op.run(p_native, g, [t.clone() for t in s0], index_offset=op.unit, **op.hyper(2))
    monkeypatch.setattr(kernels, "_native_for", lambda param: False)
    op.run(p_fallback, g, [t.clone() for t in s0], index_offset=op.unit, **op.hyper(2))
    assert _same(p_fallback, p_native)


def test_opcheck_with_index_offset(native):
    """The schemas carry index_offset; the Meta kernels accept and check it like the CPU ones."""
    n = 300
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen).to(torch.bfloat16), torch.randn(n, generator=gen).to(torch.bfloat16)
    adam = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3, stochastic_rounding=True, seed=5,
                index_offset=2**32 - 3)
    lion = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01, stochastic_rounding=True, seed=5,
                index_offset=640)
    ops = torch.ops.offload_engine
    torch.library.opcheck(ops.adam_step_.default, (p.clone(), g, torch.zeros(n), torch.zeros(n)), adam)
    torch.library.opcheck(ops.lion_step_.default, (p.clone(), g, torch.zeros(n)), lion)
    f, block = FORMATS["int8"], 64
    m_codes, m_absmax = codec.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, f, True, block)
    v_codes, v_absmax = codec.quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, f, False, block)
    mt, vt = codec.code_tables("int8", True), codec.code_tables("int8", False)
    torch.library.opcheck(ops.adam_step_blockwise_.default,
                          (p.clone(), g, m_codes.clone(), m_absmax.clone(), v_codes, v_absmax, mt.map, mt.lut, vt.map,
                           vt.lut, [mt.min_exponent, mt.mantissa_bits, vt.min_exponent, vt.mantissa_bits]),
                          dict(adam, bits=8, block=block))
    torch.library.opcheck(ops.lion_step_blockwise_.default,
                          (p.clone(), g, m_codes, m_absmax, mt.map, mt.lut, [mt.min_exponent, mt.mantissa_bits]),
                          dict(lion, bits=8, block=block))
