"""The NVMe page store: state persists in the file, a deleted or truncated file and a full disk
are clear errors that lose nothing, a failed step follows [Note: failed steps] (optim/paged.py),
and memory stays bounded by the pool (RSS measured in a fresh process)."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from offload_engine.optim import PagedAdamW, PagedAdamW8bit
from offload_engine.paging import PageIOError, PagingError

KB = 1 / 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(s, generator=g) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = 0.01 * torch.randn(p.shape, generator=g)


def _snapshot(opt, params):
    return [p.clone() for p in params], [{k: v.clone() for k, v in opt.logical_state(p).items()} for p in params]


def _assert_unchanged(opt, params, snap):
    values, states = snap
    for p, v, s in zip(params, values, states):
        assert torch.equal(p, v)
        now = opt.logical_state(p)
        assert now.keys() == s.keys() and all(torch.equal(now[k], s[k]) for k in s)


def test_state_lives_in_the_file_between_steps(tmp_path):
    (p,) = params = _params((1000,))
    opt = PagedAdamW(params, store="nvme", nvme_path=str(tmp_path), page_size_mb=16 * KB)
    _grads(params, 0)
    opt.step()
    store = opt.pager.store
    assert os.path.dirname(store.path) == str(tmp_path) and os.path.getsize(store.path) == store.nbytes
    seg = opt.pager.table.segments_of[0][0]
    with open(store.path, "rb") as f:  # the page's current place, read behind the optimizer's back
        f.seek((2 * seg.page + store._current[seg.page]) * store.page_bytes)
        page = torch.frombuffer(bytearray(f.read(store.page_bytes)), dtype=torch.uint8)
    on_disk = seg.views(page)
    state = opt.logical_state(p)
    assert torch.equal(on_disk["exp_avg"], state["exp_avg"]) and torch.equal(on_disk["exp_avg_sq"], state["exp_avg_sq"])
    assert state["exp_avg"].abs().sum() > 0
    opt.close()
    assert not os.path.exists(store.path)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_deleted_or_truncated_file_is_a_clear_error_not_garbage(tmp_path, damage):
    params = _params((5000,), (300,))
    opt = PagedAdamW8bit(params, store="nvme", nvme_path=str(tmp_path), page_size_mb=8 * KB, min_8bit_size=64)
    _grads(params, 0)
    opt.step()
    before = [p.clone() for p in params]
    path = opt.pager.store.path
    if damage == "delete":
        os.unlink(path)
    else:
        os.truncate(path, os.path.getsize(path) // 3)
    _grads(params, 1)
    with pytest.raises(PageIOError, match="deleted" if damage == "delete" else "truncated") as err:
        opt.step()
    assert err.value.path == path and path in str(err.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # refused before anything changed


def test_short_read_names_the_page_and_file(tmp_path):
    params = _params((5000,))
    opt = PagedAdamW(params, store="nvme", nvme_path=str(tmp_path), page_size_mb=8 * KB)
    _grads(params, 0)
    opt.step()
    os.truncate(opt.pager.store.path, 8192 * 3)  # pages 0 and 1 remain, later pages are gone
    opt.pager.store.check = lambda: None          # skip the pre-step check: exercise the read path
    _grads(params, 1)
    with pytest.raises(PageIOError, match=r"page \d+: .*ends at byte") as err:
        opt.step()
    assert err.value.page >= 1 and opt.pager.store.path in str(err.value)


@pytest.mark.parametrize("store", ["nvme", "cpu"])
def test_failed_write_back_keeps_the_pre_step_state_and_refuses_until_reload(tmp_path, store, monkeypatch):
    """[Note: failed steps]: NVMe commits nothing of a failed step; the optimizer then refuses
    to step until a checkpoint is loaded, after which it continues as if nothing happened."""
    params = _params((6000,), (77,), (3000,))
    nvme = dict(nvme_path=str(tmp_path)) if store == "nvme" else {}
    opt = PagedAdamW8bit(params, store=store, page_size_mb=8 * KB, min_8bit_size=64, **nvme)
    _grads(params, 0)
    opt.step()
    checkpoint = opt.state_dict()
    saved_params = [p.clone() for p in params]
    snap = _snapshot(opt, params)
    failing_page = 2
    if store == "nvme":
        real_write = opt.pager.store._write

        def write(page, buf):
            if page == failing_page:
                raise PageIOError(f"page {page}: writing {opt.pager.store.path} failed: injected EIO", page=page,
                                  path=opt.pager.store.path)
            return real_write(page, buf)
        monkeypatch.setattr(opt.pager.store, "_write", write)
        expected = PageIOError
    else:
        import offload_engine.optim.paged_step as paged_mod  # where the page update calls the kernels
        real_step, calls = paged_mod.step_state_, []

        def step_state_(*args, **kw):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("injected kernel failure")
            return real_step(*args, **kw)
        monkeypatch.setattr(paged_mod, "step_state_", step_state_)
        expected = PagingError
    _grads(params, 1)
    with pytest.raises(expected, match=r"page \d+") as err:
        opt.step()
    if store == "nvme":
        assert err.value.page == failing_page and opt.pager.store.path in str(err.value)
        # the stored state is exactly the pre-step one (params of earlier pages did move)
        for p, s in zip(params, snap[1]):
            now = opt.logical_state(p)
            assert all(torch.equal(now[k], s[k]) for k in s)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="load_state_dict"):
        opt.step()
    for p, v in zip(params, saved_params):
        p.data.copy_(v)
    opt.load_state_dict(checkpoint)
    _assert_unchanged(opt, params, snap)
    opt.step()  # the same grads: continues from the checkpoint
    assert all(not torch.equal(p, v) for p, v in zip(params, saved_params))


def test_failure_before_any_page_changes_nothing_and_is_not_recorded(tmp_path, monkeypatch):
    params = _params((5000,))
    opt = PagedAdamW(params, store="nvme", nvme_path=str(tmp_path), page_size_mb=8 * KB)
    _grads(params, 0)
    opt.step()
    snap = _snapshot(opt, params)

    def read(page, buf):
        raise PageIOError(f"page {page}: injected read error", page=page, path=opt.pager.store.path)
    monkeypatch.setattr(opt.pager.store, "_read", read)
    _grads(params, 1)
    with pytest.raises(PageIOError, match="page 0"):
        opt.step()
    monkeypatch.undo()
    _assert_unchanged(opt, params, snap)
    opt.step()  # not marked failed: nothing had changed


DISK_FULL = textwrap.dedent("""
    import json, resource, signal, sys, torch
    from offload_engine.optim import PagedAdamW
    from offload_engine.paging import PageIOError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # the limit then reads as EFBIG, not a kill
    small = [torch.randn(1000)]
    opt = PagedAdamW(small, store="nvme", nvme_path=sys.argv[1], page_size_mb=8 / 1024)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))   # a disk that is nearly full
    small[0].grad = torch.randn(1000)
    opt.step()
    before = {k: v.clone() for k, v in opt.logical_state(small[0]).items()}
    p_before = small[0].clone()
    big = torch.randn(200_000)
    opt.add_param_group({"params": [big]})
    big.grad = torch.randn(200_000)
    out = {}
    try:
        opt.step()
    except PageIOError as err:
        out["error"] = str(err)
    after = opt.logical_state(small[0])
    out["state_intact"] = all(torch.equal(after[k], before[k]) for k in before)
    out["params_intact"] = bool(torch.equal(small[0], p_before))
    out["big_untouched"] = not opt.logical_state(big)
    print(json.dumps(out))
""")


def test_disk_full_is_a_clear_error_and_the_previous_state_is_intact(tmp_path):
    """A file size limit stands in for a full disk (RLIMIT_FSIZE: the same EFBIG/ENOSPC path)."""
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cannot reserve" in out["error"] and str(tmp_path) in out["error"] and os.strerror(errno.EFBIG) in \
        out["error"]
    assert out["state_intact"] and out["params_intact"] and out["big_untouched"]


RSS_PROBE = textwrap.dedent("""
    import json, sys, threading, time, psutil, torch
    from offload_engine.optim import PagedAdamW
    numel, store, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    params = [torch.randn(numel // 4) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = PagedAdamW(params, store=store, nvme_path=path if store == "nvme" else None, page_size_mb=2,
                     prefetch_depth=2)
    proc = psutil.Process()
    base, peak, done = proc.memory_info().rss, [0], threading.Event()
    def sample():                       # RSS sampled through the steps, not only after them
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)
    t = threading.Thread(target=sample)
    t.start()
    for _ in range(3):
        opt.step()
    done.set(); t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    s = opt.paging_stats()
    print(json.dumps({"growth": peak[0] - base, "pool_bytes": s["pool_bytes"], "state_bytes": s["state_bytes"]}))
""")

RSS_CONSTANT = 24 * 2**20  # interpreter, thread stacks, kernel scratch, allocator slack


def _rss_growth(numel, store, tmp_path):
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(numel), store, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("numel", [1_000_000, 50_000_000])
def test_nvme_store_memory_is_bounded_by_the_pool(tmp_path, numel):
    out = _rss_growth(numel, "nvme", tmp_path)
    assert out["state_bytes"] == 8 * numel
    assert out["growth"] < out["pool_bytes"] + RSS_CONSTANT, out


def test_host_store_memory_grows_by_the_state(tmp_path):
    """The same probe on the host store: RSS grows by the state, so the bound above can fail."""
    out = _rss_growth(8_000_000, "cpu", tmp_path)
    assert out["growth"] > out["state_bytes"] * 0.9 and out["growth"] > out["pool_bytes"] + RSS_CONSTANT, out


def test_failed_initial_write_keeps_the_old_layout(tmp_path, monkeypatch):
    """Writing the first state of new pages fails: the layout is not adopted, and the next
    step lays out and initialises the pages again (nothing half-initialised is ever read)."""
    from offload_engine.optim import AdamW8bit
    params, twins = _params((5000,), seed=1), _params((5000,), seed=1)
    opt = PagedAdamW8bit(params, store="nvme", nvme_path=str(tmp_path), page_size_mb=4 * KB, min_8bit_size=64)
    ref = AdamW8bit(twins, min_8bit_size=64)

    def write(page, buf):
        raise PageIOError(f"page {page}: injected", page=page, path=opt.pager.store.path)
    monkeypatch.setattr(opt.pager.store, "_write", write)
    _grads(params, 0)
    with pytest.raises(PageIOError, match="page 0"):
        opt.step()
    assert opt.pager.table.num_pages == 0 and not opt.logical_state(params[0])
    monkeypatch.undo()
    for step in range(2):
        _grads(params, step)
        _grads(twins, step)
        opt.step()
        ref.step()
    assert torch.equal(params[0], twins[0])
    assert torch.equal(opt.logical_state(params[0])["exp_avg"], ref.logical_state(twins[0])["exp_avg"])


def test_host_store_chunks_hold_whole_pages_and_keep_them_as_they_grow(monkeypatch):
    """[Note: pinned chunks]: pages in chunks of at most HOST_CHUNK_BYTES, none straddling two;
    growing keeps every page's bytes (the partial last chunk grows, new chunks are added)."""
    from offload_engine.paging import stores

    page = 4096
    monkeypatch.setattr(stores, "HOST_CHUNK_BYTES", 3 * page + 100)  # 3 pages a chunk
    store = stores.HostStore(page)
    filled = 0
    for num_pages in (2, 3, 4, 8, 8, 10):
        store.allocate(num_pages)
        assert store.num_pages == num_pages and store.nbytes == num_pages * page
        for k in range(filled, num_pages):
            store.page_view(k).fill_(k + 1)
        filled = num_pages
        for k in range(num_pages):
            view = store.page_view(k)
            assert view.numel() == page and bool((view == k + 1).all()), (num_pages, k)
    assert [c.numel() for c in store._chunks] == [3 * page, 3 * page, 3 * page, page]
    buf = torch.arange(page, dtype=torch.int64).to(torch.uint8)
    store.write(7, buf).result()
    out = torch.empty(page, dtype=torch.uint8)
    store.read(7, out).result()
    assert torch.equal(out, buf) and bool((store.page_view(6) == 7).all()) and bool((store.page_view(8) == 9).all())


def test_nvme_store_collected_from_its_own_io_thread_closes_without_joining(tmp_path):
    """The store's finalizer runs wherever garbage collection happens, which can be one of its
    IO threads or a thread still starting. It must not join the IO threads there (joining from
    inside one raises; from a starting thread it deadlocked a CI run): the file still goes."""
    from offload_engine.paging.nvme_store import NvmeStore
    store = NvmeStore(4096, str(tmp_path), io_threads=2)
    store.allocate(2)
    path = store.path
    store._io.submit(store._finalizer).result(timeout=30)  # as if collected inside an IO thread
    assert not os.path.exists(path)
