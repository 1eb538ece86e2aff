"""Paged optimizers: bit-identical to the unpaged ones for any page size, prefetch depth and
store; page table layout; logical_state and state_dict through the pages; bad options."""
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from offload_engine.optim import (Adam8bit, AdamW4bit, AdamW8bit, CPUAdam, Lion, Lion8bit, PagedAdam, PagedAdam8bit,
                                  PagedAdamW, PagedAdamW8bit, PagedLion, PagedLion8bit)
from offload_engine.optim.paged import PagedOptimizer
from offload_engine.paging import PageTable, StateFormat, page_bytes_from_mb

from conftest import bits
from tolerances import CODE_HALF_GAP

# Each paged optimizer beside the unpaged one it must reproduce (same settings).
PAIRS = {
    "PagedAdam": (PagedAdam, lambda ps, **kw: CPUAdam(ps, weight_decay=0.01, adamw_mode=False, **kw), {}),
    "PagedAdamW": (PagedAdamW, lambda ps, **kw: CPUAdam(ps, weight_decay=0.01, **kw), {}),
    "PagedAdam8bit": (PagedAdam8bit, Adam8bit, {}),
    "PagedAdamW8bit": (PagedAdamW8bit, AdamW8bit, {}),
    "PagedLion": (PagedLion, Lion, {}),
    "PagedLion8bit": (PagedLion8bit, Lion8bit, {}),
}
KB = 1 / 1024  # page_size_mb of one KiB


def _make(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(s, generator=g)).to(dtype) for s in shapes]


def _paged(name, params, **options):
    paged_cls, _, _ = PAIRS[name]
    kw = dict(weight_decay=0.01, min_8bit_size=64)
    if "Lion" in name:
        kw["lr"] = 1e-3
    return paged_cls(params, **kw, **options)


def _unpaged(name, params, **options):
    paged_cls, unpaged, _ = PAIRS[name]
    kw = dict(min_8bit_size=64)
    if "Lion" in name:
        kw.update(lr=1e-3, weight_decay=0.01)
    elif name in ("PagedAdam8bit", "PagedAdamW8bit"):
        kw.update(weight_decay=0.01)
    else:
        kw = {}
    return unpaged(params, **kw, **options)


def _set_grads(a, b, step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    for x, y in zip(a, b):
        grad = (0.01 * torch.randn(x.shape, generator=g)).to(dtype)
        x.grad, y.grad = grad.clone(), grad.clone()


def _assert_same(paged, unpaged, a, b, moments):
    for x, y in zip(a, b):
        assert torch.equal(bits(x), bits(y))
        got, want = paged.logical_state(x), unpaged.logical_state(y)
        assert got.keys() == want.keys()
        for k in moments:
            assert torch.equal(bits(got[k]), bits(want[k])), k
        assert float(got["step"]) == float(want["step"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(PAIRS)),
       store=st.sampled_from(["cpu", "nvme"]),
       page_kb=st.sampled_from([4, 8, 12, 20, 64, 300]),
       prefetch_depth=st.integers(1, 4),
       shapes=st.lists(st.sampled_from([(1,), (7,), (63,), (65,), (255, 3), (1000,), (4097,), (33, 129), (3000, 7)]),
                       min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       stochastic_rounding=st.booleans(),
       seed=st.integers(0, 2**16))
# Always run: bf16 params with stochastic rounding, split across pages (fp32 and 8-bit state).
@example(name="PagedAdamW", store="cpu", page_kb=8, prefetch_depth=2, shapes=[(4097,), (65,)], dtype=torch.bfloat16,
         stochastic_rounding=True, seed=1)
@example(name="PagedLion8bit", store="nvme", page_kb=4, prefetch_depth=1, shapes=[(33, 129)], dtype=torch.bfloat16,
         stochastic_rounding=True, seed=2)
def test_paged_equals_unpaged_bit_for_bit(tmp_path, name, store, page_kb, prefetch_depth, shapes, dtype,
                                          stochastic_rounding, seed):
    """Pages smaller than one param and pages holding many tiny params; every step, every
    state tensor; some params skip a step (no grad). With stochastic rounding (bf16 params),
    each page segment draws the whole param's stream from its start on (index_offset)."""
    a, b = _make(shapes, dtype, seed), _make(shapes, dtype, seed)
    # The same torch seed before each constructor: both draw the same stochastic-rounding seed base.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        paged = _paged(name, a, store=store, nvme_path=str(tmp_path) if store == "nvme" else None,
                       page_size_mb=page_kb * KB, prefetch_depth=prefetch_depth,
                       stochastic_rounding=stochastic_rounding)
        torch.manual_seed(seed)
        unpaged = _unpaged(name, b, stochastic_rounding=stochastic_rounding)
    assert paged._seed_base == unpaged._seed_base
    moments = ("exp_avg",) if "Lion" in name else ("exp_avg", "exp_avg_sq")
    for step in range(3):
        _set_grads(a, b, step, dtype)
        if step == 1 and len(a) > 1:
            a[0].grad = b[0].grad = None
        paged.step()
        unpaged.step()
        _assert_same(paged, unpaged, a, b, moments)
    assert paged.paging_stats()["num_pages"] >= 1
    paged.close()


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_many_tiny_params_share_a_page_and_a_large_one_spans_pages(tmp_path, store):
    params = _make([(3,)] * 20 + [(50_000,)], torch.float32, 0)
    opt = PagedAdamW(params, store=store, nvme_path=str(tmp_path) if store == "nvme" else None, page_size_mb=64 * KB)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    table = opt.pager.table
    tiny_pages = {seg.page for key in range(20) for seg in table.segments_of[key]}
    assert tiny_pages == {0}  # 20 tiny params, one page
    big = table.segments_of[20]
    assert len(big) >= -(-50_000 * 8 // (64 * 1024))  # 400 KB of state in 64 KB pages
    assert sum(s.length for s in big) == 50_000 and all(s.start % 64 == 0 for s in big)
    stats = opt.paging_stats()
    assert stats["num_pages"] == table.num_pages and stats["last_step"]["pages"] == table.num_pages
    if store == "nvme":
        assert stats["last_step"]["bytes_read"] == stats["last_step"]["bytes_written"] == table.num_pages * 65536
        assert 1 <= stats["last_step"]["peak_slots_in_use"] <= stats["pool_slots"] == 4
    opt.close()


def test_page_table_segments_align_to_unit_and_block():
    fmt8 = StateFormat("int8", ("exp_avg", "exp_avg_sq"), 256)
    fp32 = StateFormat("fp32", ("exp_avg", "exp_avg_sq"))
    table = PageTable(8192)
    table.add_group(0, [(0, 10_000, fmt8), (1, 5, fp32), (2, 3000, fp32)])
    for key, unit in ((0, 256), (2, 64)):
        segs = table.segments_of[key]
        assert [s.start for s in segs] == sorted(s.start for s in segs)
        assert all(s.start % unit == 0 for s in segs)
        assert sum(s.length for s in segs) == table.numel_of[key]
    for page in table.pages:
        assert page.used <= 8192
        ends = [(s.offset, s.offset + s.fmt.nbytes(s.length)) for s in page.segments]
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:]))  # no overlap
        for seg in page.segments:
            assert all(off % 64 == 0 for _, off, _, _ in seg.arrays)
    # an int8 segment's state: one code per element per moment plus one absmax per block
    assert fmt8.logical_bytes(512) == 2 * 512 + 2 * 2 * 4
    assert table.state_bytes() == fmt8.logical_bytes(10_000) + fp32.logical_bytes(5) + fp32.logical_bytes(3000)


def test_page_smaller_than_one_block_is_refused_with_the_size_needed():
    with pytest.raises(ValueError, match="page_size_mb is too small"):
        PageTable(4096).add_group(0, [(0, 10_000, StateFormat("int8", ("exp_avg", "exp_avg_sq"), 4096))])


def test_page_size_rounds_up_to_whole_blocks():
    assert page_bytes_from_mb(1) == 2**20
    assert page_bytes_from_mb(0.0001) == 4096
    assert page_bytes_from_mb(1.5) == 3 * 2**19


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_state_dict_moves_between_paged_and_unpaged(tmp_path, store):
    """A paged optimizer's state_dict is the unpaged one's (same keys and tensors): it loads
    into AdamW8bit and back, and both continue identically."""
    nvme = dict(nvme_path=str(tmp_path)) if store == "nvme" else {}
    a, b, c = (_make([(3000, 7), (5,)], torch.float32, 3) for _ in range(3))
    paged = PagedAdamW8bit(a, min_8bit_size=64, store=store, page_size_mb=8 * KB, **nvme)
    unpaged = AdamW8bit(b, min_8bit_size=64)
    for step in range(3):
        _set_grads(a, b, step, torch.float32)
        paged.step()
        unpaged.step()
    sd_paged, sd_unpaged = paged.state_dict(), unpaged.state_dict()
    assert sd_paged.keys() == sd_unpaged.keys()
    for key in sd_unpaged["state"]:
        for name, value in sd_unpaged["state"][key].items():
            got = sd_paged["state"][key][name]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, name
    # the unpaged state continues in a fresh paged optimizer (another page size), and vice versa
    for x, z in zip(c, b):
        x.data.copy_(z)
    resumed = PagedAdamW8bit(c, min_8bit_size=64, store=store, page_size_mb=20 * KB, **nvme)
    resumed.load_state_dict(sd_unpaged)
    back = AdamW8bit(a, min_8bit_size=64)
    back.load_state_dict(sd_paged)
    for step in range(3, 6):
        _set_grads(c, b, step, torch.float32)
        for x, y in zip(a, b):
            x.grad = y.grad.clone()
        resumed.step()
        unpaged.step()
        back.step()
        _assert_same(resumed, unpaged, c, b, ("exp_avg", "exp_avg_sq"))
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_state_dict_reload_requantizes_another_block_size(tmp_path):
    a = _make([(4096,)], torch.float32, 5)
    four = AdamW4bit(a, min_8bit_size=64)
    a[0].grad = torch.randn(4096)
    four.step()
    paged = PagedAdamW8bit(_make([(4096,)], torch.float32, 5), min_8bit_size=64, block_size=512, store="nvme",
                           nvme_path=str(tmp_path))
    paged.load_state_dict(four.state_dict())
    p = paged.param_groups[0]["params"][0]
    got, want = paged.logical_state(p), four.logical_state(a[0])
    assert float(got["step"]) == 1.0
    # int4 values re-encoded as int8: within int8's half code gap of the (larger) block's absmax
    torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=0,
                               atol=CODE_HALF_GAP["int8"] * want["exp_avg"].abs().max().item())
    assert paged.state_dict()["state"][0]["block_size"] == 512


@pytest.mark.parametrize("option, value, match", [
    ("page_size_mb", 0, "page_size_mb"),
    ("page_size_mb", -1, "page_size_mb"),
    ("page_size_mb", "big", "page_size_mb"),
    ("prefetch_depth", 0, "prefetch_depth"),
    ("prefetch_depth", 1.5, "prefetch_depth"),
    ("store", "disk", "store"),
    ("io_threads", 0, "io_threads"),
])
def test_bad_options_name_the_option(option, value, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW8bit([torch.zeros(10)], **{option: value})


def test_nvme_path_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="nvme_path"):
        PagedAdamW([torch.zeros(10)], store="nvme", nvme_path=str(blocker / "sub"))
    with pytest.raises(ValueError, match="nvme_path"):
        PagedAdamW([torch.zeros(10)], store="nvme")
    with pytest.raises(ValueError, match="nvme_path"):
        PagedAdamW([torch.zeros(10)], store="cpu", nvme_path=str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if f != "a_file"]  # the probes left nothing behind


def test_every_paged_optimizer_is_a_paged_optimizer():
    for paged_cls, _, _ in PAIRS.values():
        assert issubclass(paged_cls, PagedOptimizer) and paged_cls.__name__.startswith("Paged")


def test_a_step_with_no_grads_changes_nothing():
    """A data-parallel rank whose partition is empty, or a model whose params got no grad yet,
    steps without error and without laying out state."""
    p = torch.randn(100)
    start = p.clone()
    opt = PagedAdamW8bit([p], min_8bit_size=0)
    opt.step()  # crashed before: no pages, so no scheduler
    assert opt.paging_stats()["num_pages"] == 0 and opt.state_dict()["state"] == {}
    assert opt.paging_stats()["steps"] == 0 and torch.equal(p, start)
    p.grad = torch.ones_like(p)
    before = p.clone()
    opt.step()  # the first grad lays out the state and steps as usual
    assert opt.paging_stats()["num_pages"] == 1 and not torch.equal(p, before)


def test_executor_option_is_checked():
    with pytest.raises(ValueError, match="executor"):
        PagedAdamW([torch.zeros(10)], executor="tpu")
    with pytest.raises(ValueError, match="executor='cuda'"):
        PagedAdamW([torch.zeros(10)], executor="cuda")
    opt = PagedAdamW([torch.zeros(10)], executor="cpu")
    assert opt.paging_stats()["executor"] == "cpu"
    # managed memory is the CUDA executor's store; with CPU params it is refused, naming both
    with pytest.raises(ValueError, match=r"store='managed' .*executor='cpu' with params on cpu"):
        PagedAdamW([torch.zeros(10)], store="managed")
    with pytest.raises(ValueError, match="nvme_path is only used with store='nvme'.*'managed'"):
        PagedAdamW([torch.zeros(10)], store="managed", nvme_path="/tmp")


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_pages_are_laid_out_only_for_params_that_need_state(store, tmp_path):
    """[Note: lazy layout]: frozen params cost no store; an empty state dict writes nothing; a
    param that starts getting grads later is laid out then, and equals an unpaged run."""
    extra = {"store": "nvme", "nvme_path": str(tmp_path)} if store == "nvme" else {}
    frozen, late, live = (torch.nn.Parameter(torch.randn(n)) for n in (5000, 777, 3001))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in (late, live)]
    opt = PagedAdamW([frozen, late, live], lr=1e-2, page_size_mb=0.008, **extra)
    ref = CPUAdam(twin, lr=1e-2, weight_decay=1e-2)
    opt.load_state_dict(opt.state_dict())  # what accelerate does at startup
    assert opt.paging_stats()["num_pages"] == 0 and opt.paging_stats()["totals"]["bytes_written"] == 0
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        live.grad = torch.randn(3001, generator=g)
        twin[1].grad = live.grad.clone()
        if step >= 2:  # `late` gets grads from the third step on
            late.grad = torch.randn(777, generator=g)
            twin[0].grad = late.grad.clone()
        opt.step()
        ref.step()
    assert opt.paging_stats()["state_bytes"] == 8 * (777 + 3001)
    assert frozen not in opt.state
    for p, q in zip((late, live), twin):
        assert torch.equal(p.detach(), q.detach())
        for key, value in ref.logical_state(q).items():
            assert torch.equal(opt.logical_state(p)[key], value)
    opt.close()


@pytest.mark.parametrize("name", ["PagedAdamW", "PagedAdamW8bit"])
def test_pages_moved_by_a_later_group_are_updated_where_they_now_are(name):
    """[Note: page views]: the host store keeps each page's state views between steps; a param
    group added later grows the store's last chunk, which moves every page in it, and the
    next steps must update the pages at their new place (a kept view of the old chunk would
    update bytes the store no longer reads: the stored state stays behind the unpaged run's)."""
    first, later = _make([(37, 29), (300,)], torch.float32, 3), _make([(61, 17)], torch.float32, 4)
    clones = [[p.clone() for p in ps] for ps in (first, later)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        paged = _paged(name, first, page_size_mb=2 * KB)
        torch.manual_seed(0)
        unpaged = _unpaged(name, clones[0])
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        if step == 2:
            address = paged.pager.store.page_view(0).data_ptr()
            paged.add_param_group({"params": later})
            unpaged.add_param_group({"params": clones[1]})
        mine = first + (later if step >= 2 else [])
        theirs = clones[0] + (clones[1] if step >= 2 else [])
        for p, q in zip(mine, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        paged.step()
        unpaged.step()
        _assert_same(paged, unpaged, mine, theirs, ("exp_avg", "exp_avg_sq"))  # the state as stored, too
    assert paged.pager.store.page_view(0).data_ptr() != address  # the group did move page 0
