"""The hybrid executor (paging/executors/hybrid.py): a step's pages split between a device side
and a host side that run at the same time, bit for bit either executor alone.

On a machine without a GPU the split itself is checked with two CPU executors composed as the
hybrid composes the CUDA pair (HybridExecutor takes any two executors): every page updated by
exactly one side, with the same arguments, whatever the fraction, rebalancing between steps.
The hybrid the config names is refused with CPU params, naming the key. The CUDA pair, bit for
bit the CUDA and the CPU executors alone, is CUDA-marked (skipped here)."""
from __future__ import annotations

import pytest
import torch

import offload_engine
from offload_engine.config import ConfigError, load_config
from offload_engine.optim import PagedAdamW, PagedAdamW8bit, PagedLion8bit
from offload_engine.paging import footprint as fp
from offload_engine.paging.executors.cpu import CpuExecutor
from offload_engine.paging.executors.hybrid import HybridExecutor, Split, balanced_fraction
from conftest import bits

KB = 1 / 1024
SHAPES = [(1,), (255,), (4097,), (300, 301), (65,), (70_001,)]
CLASSES = [PagedAdamW, PagedAdamW8bit, PagedLion8bit]


def _params(dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(s, generator=g)).to(dtype).to(device).requires_grad_() for s in SHAPES]


def _make(cls, params, **kw):
    extra = dict(min_8bit_size=64) if cls is not PagedAdamW else {}
    if cls is PagedLion8bit:
        extra.update(lr=1e-3, weight_decay=1e-2)
    return cls(params, page_size_mb=16 * KB, **extra, **kw)


def _stand_in(fraction, rebalance):
    return HybridExecutor(CpuExecutor(), CpuExecutor(), fraction, rebalance)


def _run(opts_and_params, steps, dtype):
    """Steps every (optimizer, params) on the same random grads; yields after each step."""
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        grads = [(0.01 * torch.randn(s, generator=g)).to(dtype) for s in SHAPES]
        for opt, params in opts_and_params:
            for p, grad in zip(params, grads):
                p.grad = grad.to(p.device)
            opt.step()
        yield step


def _assert_same(a_opt, a_params, b_opt, b_params, where):
    for x, y in zip(a_params, b_params):
        assert torch.equal(bits(x.detach().cpu()), bits(y.detach().cpu())), where
        sa, sb = a_opt.logical_state(x), b_opt.logical_state(y)
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(bits(sa[k].cpu().float()), bits(sb[k].cpu().float())), (where, k)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction, rebalance", [(0.0, False), (0.3, False), (1.0, False), (0.5, True)])
def test_split_step_is_bit_for_bit_one_executor(cls, dtype, fraction, rebalance):
    """Every page on one side or the other, each with the arguments the executor alone uses:
    params and state equal the CPU executor's after every step (fp32 and 8-bit state, bf16
    params with fp32 masters), at any fraction, also while the split moves."""
    ref_params, hyb_params = _params(dtype), _params(dtype)
    ref = _make(cls, ref_params)
    hyb = _make(cls, hyb_params, executor=_stand_in(fraction, rebalance))
    for step in _run([(ref, ref_params), (hyb, hyb_params)], 5, dtype):
        _assert_same(ref, ref_params, hyb, hyb_params, f"step {step}")
    split = hyb.paging_stats()["split"]
    pages = hyb.paging_stats()["num_pages"]
    assert split["device_pages"] + split["host_pages"] == pages > 2
    if not rebalance:  # a fixed split stays, and assigns round(fraction * pages) to the device side
        assert split["gpu_fraction"] == fraction and split["rebalanced"] == 0
        assert split["device_pages"] == round(fraction * pages)
    else:  # both sides keep a page, so both stay measured
        assert split["device_pages"] >= 1 and split["host_pages"] >= 1


def test_hybrid_reports_its_split_and_the_cuda_footprint():
    params = _params(torch.float32)
    opt = _make(PagedAdamW, params, executor=_stand_in(0.25, False))
    for _ in _run([(opt, params)], 1, torch.float32):
        pass
    stats = opt.paging_stats()
    assert stats["executor"] == "hybrid" and stats["last_step"]["pages"] == stats["num_pages"]
    # The footprint rule: the CUDA side's k + 2 device slots, the host pages pinned for its copies.
    foot = fp.footprint("cpu", "hybrid", 2, 4096, 10)
    assert foot == fp.Footprint(gpu=4 * 4096, pinned_host=10 * 4096)
    with pytest.raises(ValueError, match="hybrid.*not in host memory"):
        fp.footprint("nvme", "hybrid", 2, 4096, 10)


def test_split_assignment_and_rebalancing():
    split = Split(0.3, rebalance=False)
    assert split.assign([5, 1, 3, 2, 4, 0, 9, 8, 7, 6]) == ([0, 1, 2], [3, 4, 5, 6, 7, 8, 9])
    assert Split(0.0, False).assign(range(4)) == ([], [0, 1, 2, 3])
    assert Split(1.0, True).assign(range(4)) == ([0, 1, 2], [3])   # rebalancing keeps a host page
    assert Split(0.0, True).assign(range(4)) == ([0], [1, 2, 3])
    assert Split(0.0, True).assign([7]) == ([], [7])
    # Rates 4 pages/s (device) and 1 page/s (host): equal times at 0.8 on the device side.
    assert balanced_fraction(4, 4, 1.0, 4.0) == pytest.approx(0.8)
    assert balanced_fraction(0, 4, 0.0, 1.0) is None and balanced_fraction(2, 2, 0.0, 1.0) is None
    moving = Split(0.5, rebalance=True)
    moving.record(4, 4, 1.0, 4.0)
    assert moving.gpu_fraction == pytest.approx(0.65) and moving.rebalanced == 1  # halfway to 0.8
    for _ in range(30):
        n_dev = round(moving.gpu_fraction * 100)
        moving.record(n_dev, 100 - n_dev, n_dev / 4.0, (100 - n_dev) / 1.0)  # the same rates every step
    assert moving.gpu_fraction == pytest.approx(0.8, abs=0.01)
    fixed = Split(0.5, rebalance=False)
    fixed.record(4, 4, 1.0, 4.0)
    assert fixed.gpu_fraction == 0.5 and fixed.rebalanced == 0
    with pytest.raises(ValueError, match="gpu_fraction must be in"):
        Split(1.5, True)


def test_hybrid_is_refused_on_cpu_naming_the_argument_or_key(tmp_path):
    """Not silently run as the CPU executor: the optimizer and the config each say why."""
    with pytest.raises(ValueError, match=r"executor='hybrid' splits each step .* needs CUDA params; the params "
                                         r"are on cpu"):
        PagedAdamW([torch.zeros(10, requires_grad=True)], executor="hybrid")
    with pytest.raises(ValueError, match=r"gpu_fraction must be a number in \[0, 1\]"):
        PagedAdamW([torch.zeros(10, device="meta", requires_grad=True)], executor="hybrid", gpu_fraction=2)
    with pytest.raises(ValueError, match="gpu_fraction is the hybrid executor's split; the executor is 'cpu'"):
        PagedAdamW([torch.zeros(10, requires_grad=True)], executor="cpu", gpu_fraction=0.5)
    with pytest.raises(ValueError, match="needs store='cpu'"):
        PagedAdamW([torch.zeros(10, requires_grad=True)], executor=_stand_in(0.5, True), store="nvme",
                   nvme_path=str(tmp_path))
    model = torch.nn.Linear(4, 4)
    base = {"train_batch_size": 1, "optimizer": {"type": "PagedAdamW"}}
    with pytest.raises(ConfigError, match=r"paging\.executor: 'hybrid' splits each step .* the params are on cpu"):
        offload_engine.initialize(model=model, config={**base, "paging": {"executor": "hybrid"}})
    with pytest.raises(ConfigError, match=r"paging\.executor: 'hybrid' .* needs paging\.store 'cpu'"):
        load_config({**base, "paging": {"executor": "hybrid", "store": "nvme", "nvme_path": str(tmp_path)}}) \
            .paging_settings()
    with pytest.raises(ConfigError, match=r"paging\.gpu_fraction: applies to paging\.executor 'hybrid'"):
        load_config({**base, "paging": {"executor": "cpu", "gpu_fraction": 0.4}}).paging_settings()
    with pytest.raises(ConfigError, match=r"paging\.gpu_fraction"):
        load_config({**base, "paging": {"executor": "hybrid", "gpu_fraction": 1.5}})


def test_config_passes_the_split_to_the_optimizer():
    cfg = load_config({"train_batch_size": 1, "optimizer": {"type": "PagedAdamW8bit"},
                       "paging": {"executor": "hybrid", "gpu_fraction": 0.7, "rebalance": False}})
    spec = cfg.optimizer_spec()
    assert spec.kwargs["executor"] == "hybrid"
    assert spec.kwargs["gpu_fraction"] == 0.7 and spec.kwargs["rebalance"] is False


# ---- the CUDA pair (skipped without a GPU: conftest's gpu fixture) -----------------------

@pytest.mark.cuda
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction, rebalance", [(0.4, False), (0.5, True), (0.0, False), (1.0, False)])
def test_cuda_hybrid_is_bit_for_bit_the_cuda_and_cpu_executors(gpu, cls, dtype, fraction, rebalance):
    hyb_params, cuda_params, cpu_params = _params(dtype, gpu), _params(dtype, gpu), _params(dtype, gpu)
    hyb = _make(cls, hyb_params, executor="hybrid", gpu_fraction=fraction, rebalance=rebalance)
    on_gpu = _make(cls, cuda_params, executor="cuda")
    on_cpu = _make(cls, cpu_params, executor="cpu")
    for step in _run([(hyb, hyb_params), (on_gpu, cuda_params), (on_cpu, cpu_params)], 4, dtype):
        torch.cuda.synchronize(gpu)
        _assert_same(on_gpu, cuda_params, hyb, hyb_params, f"step {step} vs cuda")
        _assert_same(on_cpu, cpu_params, hyb, hyb_params, f"step {step} vs cpu")
    stats = hyb.paging_stats()
    assert stats["executor"] == "hybrid" and stats["device_pool_bytes"] == 4 * stats["page_bytes"]
    split = stats["split"]
    if 0.0 < fraction < 1.0 or rebalance:
        assert split["device_pages"] >= 1 and split["host_pages"] >= 1


def test_the_benchmark_runs_with_the_stand_in(tmp_path):
    """benchmarks/hybrid_step.py end to end where no GPU is lent (its times are not asserted)."""
    import json

    from conftest import import_benchmark
    bench = import_benchmark("hybrid_step")
    out = tmp_path / "rows.json"
    assert bench.main(["--stand-in", "--sizes", "3e5", "--state", "int8", "--steps", "1", "--warmup", "2",
                       "--page-size-mb", "0.25", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["device"].startswith("stand-in") and len(record["rows"]) == 1
    row = record["rows"][0]
    split = row["hybrid"]["split"]
    assert split["device_pages"] >= 1 and split["host_pages"] >= 1
    assert row["hybrid_vs_faster"] == row["hybrid"]["step_ms"] / min(row["cuda"]["step_ms"], row["cpu"]["step_ms"])
