"""Paged optimizers with CUDA params (paging/cuda_pipeline.py): pinned host pages -> device
slots -> CUDA kernel -> host, NVMe -> pinned staging -> device slots, and CUDA managed memory
prefetched by the driver; each bit for bit the unpaged CUDA optimizers and the CPU ones, with
GPU memory for state equal to the slots whatever the model size. Skipped without a GPU."""
import gc

import pytest
import torch

from offload_engine.optim import AdamW8bit, CPUAdam, Lion8bit, PagedAdamW, PagedAdamW8bit, PagedLion8bit
from offload_engine.paging import PageIOError
from conftest import bits

pytestmark = pytest.mark.cuda
KB = 1 / 1024




PAIRS = [
    (PagedAdamW, lambda ps: CPUAdam(ps, weight_decay=1e-2), ("exp_avg", "exp_avg_sq")),
    (PagedAdamW8bit, lambda ps: AdamW8bit(ps, min_8bit_size=64), ("exp_avg", "exp_avg_sq")),
    (PagedLion8bit, lambda ps: Lion8bit(ps, lr=1e-3, weight_decay=1e-2, min_8bit_size=64), ("exp_avg",)),
]
SHAPES = [(1,), (7,), (4097,), (300, 301), (65,), (1_000_003,)]


def _params(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(s, generator=g)).to(dtype).to(device) for s in SHAPES]


def _paged(cls, params, **kw):
    extra = dict(min_8bit_size=64) if cls is not PagedAdamW else {}
    if cls is PagedLion8bit:
        extra.update(lr=1e-3, weight_decay=1e-2)
    return cls(params, **extra, **kw)


@pytest.mark.parametrize("paged_cls, unpaged, moments", PAIRS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("page_kb, depth", [(8, 1), (64, 2), (1024, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", ["cpu", "nvme", "managed"])
def test_cuda_paged_equals_unpaged_cuda_and_cpu(gpu, tmp_path, paged_cls, unpaged, moments, page_kb, depth, dtype,
                                                store):
    on_gpu, ref_gpu, ref_cpu = _params(gpu, dtype), _params(gpu, dtype), _params("cpu", dtype)
    nvme = dict(nvme_path=str(tmp_path)) if store == "nvme" else {}
    paged = _paged(paged_cls, on_gpu, page_size_mb=page_kb * KB, prefetch_depth=depth, store=store, **nvme)
    ref, cpu = unpaged(ref_gpu), unpaged(ref_cpu)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        for a, b, c in zip(on_gpu, ref_gpu, ref_cpu):
            grad = (0.01 * torch.randn(a.shape, generator=g)).to(dtype)
            a.grad, b.grad, c.grad = grad.to(gpu), grad.to(gpu), grad.clone()
        paged.step()
        ref.step()
        cpu.step()
        for a, b, c in zip(on_gpu, ref_gpu, ref_cpu):
            assert torch.equal(bits(a.cpu()), bits(b.cpu())) and torch.equal(bits(a.cpu()), bits(c))
            got, want, want_cpu = paged.logical_state(a), ref.logical_state(b), cpu.logical_state(c)
            for k in moments:
                assert torch.equal(bits(got[k].cpu()), bits(want[k].cpu())), k
                assert torch.equal(bits(got[k].cpu()), bits(want_cpu[k])), k
    stats = paged.paging_stats()
    slots = 0 if store == "managed" else (depth + 2) * stats["page_bytes"]
    assert stats["device"].startswith("cuda") and stats["device_pool_bytes"] == slots
    assert stats["store"] == store and stats["last_step"]["bytes_read"] == stats["num_pages"] * stats["page_bytes"]


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_gpu_memory_for_state_is_the_slots_whatever_the_model_size(gpu, tmp_path, store):
    """Peak GPU memory during a step, beyond params and grads, is the device slots: the same
    at 10M and 100M params, from pinned host pages and from the NVMe file."""
    extra = []
    nvme = dict(nvme_path=str(tmp_path)) if store == "nvme" else {}
    for numel in (10_000_000, 100_000_000):
        gc.collect()  # tensors of earlier tests that wait in reference cycles
        start = torch.cuda.memory_allocated(gpu)
        p = torch.randn(numel, device=gpu) * 0.1
        p.grad = torch.randn(numel, device=gpu) * 0.01
        opt = PagedAdamW8bit([p], min_8bit_size=0, page_size_mb=4, prefetch_depth=2, store=store, **nvme)
        opt.step()  # lays out and allocates the slots
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(gpu)
        base = torch.cuda.memory_allocated(gpu)
        opt.step()
        torch.cuda.synchronize()
        extra.append(torch.cuda.max_memory_allocated(gpu) - base)
        slots = opt.paging_stats()["device_pool_bytes"]
        assert slots == 4 * 4 * 2**20
        assert base - start - 2 * 4 * numel <= slots + 2**20 * 4   # resident: params, grads, slots, code tables
        opt.close()
        del opt, p
        torch.cuda.empty_cache()
    assert extra[0] == extra[1] and extra[1] < 2**20, extra  # a step allocates nothing more


def test_managed_store_never_takes_more_than_the_gpu_has_free(gpu, monkeypatch):
    """[Note: managed memory budget]: an arena beyond the GPU's free memory is refused before
    anything is allocated, with the numbers; the optimizer keeps its state and works on."""
    p = torch.randn(100_000, device=gpu)
    p.grad = torch.full_like(p, 0.01)
    opt = PagedAdamW([p], store="managed", page_size_mb=64 * KB)
    opt.step()
    before = opt.logical_state(p)
    q = torch.randn(1_000_000, device=gpu)
    opt.add_param_group({"params": [q]})
    q.grad = torch.full_like(q, 0.01)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    with pytest.raises(PageIOError, match=r"exceed the free memory .*1\.0 MiB free of 81920\.0 MiB"):
        opt.step()
    monkeypatch.undo()
    after = opt.logical_state(p)
    assert all(torch.equal(before[k], after[k]) for k in ("exp_avg", "exp_avg_sq"))
    opt.step()  # with room again, the new param gets its pages
    assert opt.paging_stats()["num_pages"] > 2


def test_nvme_to_gpu_failed_write_keeps_the_pre_step_state(gpu, tmp_path, monkeypatch):
    """NVMe -> GPU commits nothing of a failed step ([Note: shadow pages]): the file still
    holds the pre-step state, and the optimizer refuses to step until a reload."""
    params = [torch.randn(6000, device=gpu), torch.randn(3000, device=gpu)]
    opt = PagedAdamW8bit(params, store="nvme", nvme_path=str(tmp_path), page_size_mb=8 * KB, min_8bit_size=64)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    opt.step()
    checkpoint = opt.state_dict()
    before = [opt.logical_state(p) for p in params]
    real_write = opt.pager.store._write

    def write(page, buf):
        if page == 2:
            raise PageIOError(f"page {page}: writing {opt.pager.store.path} failed: injected EIO", page=page,
                              path=opt.pager.store.path)
        return real_write(page, buf)
    monkeypatch.setattr(opt.pager.store, "_write", write)
    with pytest.raises(PageIOError, match="page 2") as err:
        opt.step()
    assert opt.pager.store.path in str(err.value)
    for p, s in zip(params, before):
        now = opt.logical_state(p)
        assert all(torch.equal(now[k], s[k]) for k in s)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="load_state_dict"):
        opt.step()
    opt.load_state_dict(checkpoint)
    opt.step()


def test_cuda_paged_state_dict_continues_on_the_cpu(gpu):
    on_gpu, on_cpu = _params(gpu, torch.float32, 3), _params("cpu", torch.float32, 3)
    paged = _paged(PagedAdamW8bit, on_gpu, page_size_mb=16 * KB)
    for p in on_gpu:
        p.grad = torch.full_like(p, 0.01)
    paged.step()
    for a, c in zip(on_gpu, on_cpu):
        c.data.copy_(a.cpu())
    cpu = AdamW8bit(on_cpu, min_8bit_size=64)
    cpu.load_state_dict(paged.state_dict())
    for a, c in zip(on_gpu, on_cpu):
        a.grad = torch.full_like(a, -0.02)
        c.grad = torch.full_like(c, -0.02)
    paged.step()
    cpu.step()
    for a, c in zip(on_gpu, on_cpu):
        assert torch.equal(a.cpu(), c)


def test_mixed_devices_and_managed_with_the_cpu_executor_are_refused(gpu):
    with pytest.raises(ValueError, match="one device"):
        PagedAdamW([torch.zeros(4, device=gpu), torch.zeros(4)])
    with pytest.raises(ValueError, match="store='managed'.*executor='cpu'"):
        PagedAdamW([torch.zeros(4, device=gpu)], store="managed", executor="cpu")


@pytest.mark.parametrize("paged_cls", [PagedAdamW, PagedAdamW8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("store", ["cpu", "nvme"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_executor_for_cuda_params_equals_the_cuda_executor(gpu, tmp_path, paged_cls, store, dtype):
    """executor='cpu' (ZeRO-Offload style: grads and params to pinned host memory, SIMD update,
    params back) gives the CUDA executor's bits, and holds no optimizer state on the GPU."""
    a, b = _params(gpu, dtype, 5), _params(gpu, dtype, 5)
    nvme = dict(nvme_path=str(tmp_path)) if store == "nvme" else {}
    on_cpu = _paged(paged_cls, a, executor="cpu", store=store, page_size_mb=64 * KB, **nvme)
    on_gpu = _paged(paged_cls, b, executor="cuda", page_size_mb=64 * KB)
    for step in range(3):
        g = torch.Generator().manual_seed(200 + step)
        for x, y in zip(a, b):
            grad = (0.01 * torch.randn(x.shape, generator=g)).to(dtype).to(gpu)
            x.grad, y.grad = grad.clone(), grad.clone()
        torch.cuda.synchronize()
        gc.collect()  # so no garbage of earlier tests is freed during the step
        before = torch.cuda.memory_allocated(gpu)
        on_cpu.step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(gpu) == before  # no state, no slots on the GPU
        on_gpu.step()
        for x, y in zip(a, b):
            assert torch.equal(bits(x.cpu()), bits(y.cpu()))
            sx, sy = on_cpu.logical_state(x), on_gpu.logical_state(y)
            assert all(torch.equal(bits(sx[k].cpu()), bits(sy[k].cpu())) for k in ("exp_avg", "exp_avg_sq"))
    stats = on_cpu.paging_stats()
    assert stats["executor"] == "cpu" and stats["device_pool_bytes"] == 0 and stats["pinned_host_bytes"] > 0


def test_cpu_executor_sees_params_changed_on_the_gpu(gpu):
    """[Note: CPU executor for CUDA params]: the GPU param is the truth every step."""
    (p,) = params = [torch.randn(1000, device=gpu)]
    opt = PagedAdamW(params, executor="cpu", lr=0.0, weight_decay=0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    with torch.no_grad():
        p.fill_(3.0)  # a model reload between steps
    opt.step()        # lr 0: the param must stay what the GPU holds
    assert torch.equal(p, torch.full_like(p, 3.0))
