"""The planner (offload_engine/plan/): bytes per tier equal to what the optimizer the chosen
config builds then reports, feasibility and ranking on synthetic probes, bad inputs named, and
the CLI end to end on a tiny model. No timing is asserted: predictions are compared with the
step model's own arithmetic on made-up rates."""
from __future__ import annotations

import json

import pytest
import torch

from offload_engine.config import load_config
from offload_engine.plan import MachineProbe, PlanError, cli, make_plan, save_cache
from offload_engine.plan.candidates import Candidate, config_for
from offload_engine.plan.cost import predict
from offload_engine.plan.sizing import footprint_of, size_rank
from offload_engine.plan.workload import from_module, workload
from offload_engine.train.job import load_config_dict
from offload_engine.train.models import build_model

GB = 1e9


def synthetic(disk_path=None, ram=64 << 30, cores=4, fp32=2e9, int8=3e9, both=4.0) -> MachineProbe:
    rates = {"fp32": fp32, "int8": int8, "fp32+master": fp32 * 0.8, "int8+master": int8 * 0.8}
    by_page = lambda r: {mb: {"1": r / 2, str(cores): r} for mb in ("1", "4", "16")}  # noqa: E731
    disk = None if disk_path is None else {
        "path": str(disk_path), "direct_io": True, "io_threads": 4,
        "by_page_mb": {mb: {"write_gbps": 2.0, "read_gbps": 2.0, "both_gbps": both} for mb in ("1", "4", "16")}}
    return MachineProbe(host="h", date="2026-12-07T00:00:00+00:00", cpu="synthetic", cores=cores, torch="x",
                        host_ram_available=ram, host_copy_gbps=40.0, disk=disk,
                        update={k: by_page(v) for k, v in rates.items()},
                        param_overhead_s={"fp32": 1e-5, "int8": 2e-5}, gpu=None, seconds=0.0)


@pytest.fixture(scope="module")
def base():
    return load_config_dict(None)[0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("cand", [Candidate("int8", "cpu", "cpu", 1.0, 2), Candidate("fp32", "cpu", "cpu", 0.25, 2),
                                  Candidate("int8", "nvme", "cpu", 0.5, 3), Candidate("fp32", "nvme", "cpu", 1.0, 2)],
                         ids=lambda c: c.label().replace(" ", "-"))
def test_planned_bytes_are_what_the_optimizer_reports(base, cand, dtype, tmp_path):
    """The bytes per tier the planner predicts, on meta params, equal paging_stats()'s
    footprint of the optimizer the written config builds, after a step on the real params."""
    module = build_model("tiny").module.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    work = from_module(module, "tiny", dtype)
    config = config_for(base, cand, str(tmp_path))
    size = size_rank(config, work)
    params = [p for p in module.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = load_config(config).optimizer_spec(param_dtype_is_fp32=dtype == "fp32").build(params)
    try:
        opt.step()
        stats = opt.paging_stats()
        assert stats["num_pages"] == size.pages and stats["page_bytes"] == size.page_bytes
        assert footprint_of(size, cand).as_dict() == stats["footprint"]
        assert size.optimizer == type(opt).__name__
        assert sum(size.numel.values()) == sum(p.numel() for p in params)
        assert any(k.endswith("+master") for k in size.numel) == (dtype == "bf16")
    finally:
        opt.close()


def test_ranks_share_the_state_as_the_partition_cuts_it(base):
    work = workload("small", dtype="fp32", ranks_per_node=2)
    config = config_for(base, Candidate("fp32", "cpu", "cpu", 1.0, 2), None)
    one = size_rank(config, workload("small", dtype="fp32"))
    halves = [size_rank(config, work, r) for r in range(2)]
    assert sum(sum(h.numel.values()) for h in halves) == sum(one.numel.values())
    assert all(abs(sum(h.numel.values()) - sum(one.numel.values()) / 2) < 4096 for h in halves)


def test_the_step_model_arithmetic(base, tmp_path):
    """predict() is [Note: step model]: update from the rate at the page size and threads,
    params from the per-param cost, io over every page but the ends at the store's rate."""
    probe = synthetic(tmp_path, cores=4, fp32=2e9, both=4.0)
    work = workload(params=3 << 24, dtype="fp32")
    host = Candidate("fp32", "cpu", "cpu", 4.0, 2)
    size = size_rank(config_for(base, host, None), work)
    t = predict(probe, size, host, threads=4)
    assert t.update_s == pytest.approx((3 << 24) / 2e9) and t.params_s == pytest.approx(3 * 1e-5)
    assert t.io_s == 0 and t.step_s == pytest.approx(t.update_s + t.params_s) and t.bound == "update"
    assert predict(probe, size, host, threads=2).update_s == pytest.approx((3 << 24) / 1e9)  # nearest below: 1 thread
    nvme = Candidate("fp32", "nvme", "cpu", 4.0, 2)
    t = predict(probe, size, nvme, threads=4)
    page = 4 << 20
    assert t.io_s == pytest.approx(2 * (size.pages - 1) * page / (4.0 * GB))
    assert t.fill_s == pytest.approx(2 * page / (2.0 * GB))
    assert t.step_s == pytest.approx(max(t.update_s + t.params_s, t.io_s) + t.fill_s) and t.bound == "disk"
    shared = predict(probe, size, nvme, threads=4, ranks_per_disk=2)
    assert shared.io_s == pytest.approx(2 * t.io_s)


def test_feasibility_and_ranking(base, tmp_path):
    work = workload("medium", dtype="fp32")
    plan = make_plan(work, synthetic(tmp_path), base, nvme_path=str(tmp_path))
    feasible = [r for r in plan.rows if r.infeasible is None]
    assert len(feasible) == len(plan.rows) == 18
    steps = [r.predicted.step_s for r in feasible]
    assert steps == sorted(steps) and plan.choice is feasible[0]
    assert plan.choice.candidate.store == "cpu" and plan.choice.candidate.state_dtype == "int8"  # int8 is faster here
    # host RAM for just the smallest NVMe slot pool: host pages are out, that NVMe row is in
    slots_only = min(r.node.host_ram for r in plan.rows if r.candidate.store == "nvme")
    assert slots_only < min(r.node.host_ram for r in plan.rows if r.candidate.store == "cpu")
    tight = make_plan(work, synthetic(tmp_path, ram=slots_only), base, nvme_path=str(tmp_path))
    assert tight.choice.candidate.store == "nvme"
    for row in tight.rows:
        if row.candidate.store == "cpu":
            assert row.infeasible and "host RAM" in row.infeasible and row.predicted is None
    # without --nvme-path, or with another disk probed, NVMe configurations say why they are out
    no_path = make_plan(work, synthetic(), base)
    assert all("nvme_path" in r.infeasible for r in no_path.rows if r.candidate.store == "nvme")
    other = make_plan(work, synthetic(tmp_path / "elsewhere"), base, nvme_path=str(tmp_path))
    assert all("probe it" in r.infeasible for r in other.rows if r.candidate.store == "nvme")
    # a disk twice as fast halves the io of every NVMe row
    fast = make_plan(work, synthetic(tmp_path, both=8.0), base, nvme_path=str(tmp_path))
    io = {r.candidate: r.predicted.io_s for r in plan.rows if r.candidate.store == "nvme"}
    for r in fast.rows:
        if r.candidate.store == "nvme":
            assert r.predicted.io_s == pytest.approx(io[r.candidate] / 2)


def with_gpu(probe: MachineProbe, both=20.0, free=80 << 30) -> MachineProbe:
    import dataclasses
    return dataclasses.replace(probe, gpu={"name": "synthetic", "free_bytes": free, "count": 1, "h2d_gbps": both / 2,
                                           "d2h_gbps": both / 2, "both_gbps": both})


def test_the_hybrid_split_balances_the_two_sides(base):
    """[Note: hybrid model]: the split f at which f x (CUDA alone) and (1 - f) x (CPU alone)
    meet, unless the shared PCIe link is slower; the step at most the faster pure one."""
    from offload_engine.plan.cost import hybrid_split
    probe = with_gpu(synthetic(cores=4, fp32=2e9), both=200.0)  # a link fast enough not to bind
    work = workload(params=3 << 24, dtype="fp32")
    cand = Candidate("fp32", "cpu", "hybrid", 4.0, 2)
    size = size_rank(config_for(base, Candidate("fp32", "cpu", "cpu", 4.0, 2), None), work)
    gpu = predict(probe, size, Candidate("fp32", "cpu", "cuda", 4.0, 2), threads=4, gpu_params=True)
    cpu = predict(probe, size, Candidate("fp32", "cpu", "cpu", 4.0, 2), threads=4, gpu_params=True)
    t = hybrid_split(probe, size, cand, threads=4)
    assert predict(probe, size, cand, threads=4, gpu_params=True) == t
    pages = 2 * (size.pages - 1) * size.page_bytes

    def step_at(f, both):
        return max(f * gpu.step_s, (1 - f) * cpu.step_s, (f * pages + (1 - f) * 2 * size.param_bytes) / (both * GB))

    assert 0 < t.gpu_fraction < 1 and t.step_s == pytest.approx(step_at(t.gpu_fraction, 200.0))
    assert t.step_s == pytest.approx(min(step_at(i / 100, 200.0) for i in range(101)))
    assert t.step_s < min(gpu.step_s, cpu.step_s)
    # Both sides share the link: the CPU side moves a param and its grad (8 bytes per element
    # here), the CUDA side a page in and out (16), so moving pages to the CPU side pays while
    # the CPU keeps up.
    assert t.bound == "pcie"
    # a CPU twice as fast takes a larger share
    faster = hybrid_split(with_gpu(synthetic(cores=4, fp32=4e9), both=200.0), size, cand, threads=4)
    assert faster.gpu_fraction < t.gpu_fraction and faster.step_s < t.step_s
    # the plan lists it with its split, and its config is one initialize() takes
    plan = make_plan(work, probe, base, stores=["cpu"], state_dtypes=["fp32"])
    rows = [r for r in plan.rows if r.candidate.executor == "hybrid"]
    assert rows and all(r.candidate.gpu_fraction == r.predicted.gpu_fraction for r in rows)
    assert "hybrid" in rows[0].candidate.label() and "% GPU" in rows[0].candidate.label()
    paging = load_config(rows[0].config).paging_settings()
    assert paging.executor == "hybrid" and paging.gpu_fraction == round(rows[0].candidate.gpu_fraction, 4)
    # its host side stages (1 - f) of the params in pinned buffers, beside the CUDA footprint
    row = rows[0]
    cuda_foot = footprint_of(row.rank, dataclasses_replace(row.candidate, executor="cuda", gpu_fraction=None))
    staged = row.footprint.pinned_host - cuda_foot.pinned_host
    assert staged == int(2 * (1 - row.candidate.gpu_fraction) * row.rank.param_bytes)


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_auto_executor_is_the_planners_choice_for_cuda_params(base):
    """[Note: auto executor]: costed over the optimizer's own layout on meta params; no
    cached probe (or none with a GPU) keeps the CUDA executor and says how to change that."""
    from offload_engine.plan.auto import choose_executor
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(4096, 4096)] * 3 + [(333,)]]
    kwargs = dict(store="cpu", page_size_mb=4.0, prefetch_depth=2)
    none = choose_executor("PagedAdamW", kwargs, params, None)
    assert none.executor == "cuda" and "offload-plan probe" in none.why
    assert choose_executor("PagedAdamW", kwargs, params, synthetic()).executor == "cuda"  # probed without a GPU
    probe = with_gpu(synthetic(cores=4, fp32=2e9), both=20.0)
    choice = choose_executor("PagedAdamW", kwargs, params, probe)
    assert choice.executor == "hybrid" and 0 < choice.gpu_fraction < 1
    assert choice.predicted_s["hybrid"] == min(choice.predicted_s.values()) and set(choice.predicted_s) == \
        {"cuda", "cpu", "hybrid"}
    assert "hybrid" in choice.why and probe.date in choice.why
    # a CPU update far faster than PCIe: the CPU executor alone; a tiny GPU: only the CPU executor fits
    fast_cpu = choose_executor("PagedAdamW", kwargs, params, with_gpu(synthetic(cores=4, fp32=1e12), both=20.0))
    assert fast_cpu.executor in ("cpu", "hybrid") and fast_cpu.predicted_s["cpu"] < fast_cpu.predicted_s["cuda"]
    tiny = choose_executor("PagedAdamW", kwargs, params, with_gpu(synthetic(), free=1 << 20))
    assert tiny.executor == "cpu"
    only_cuda = choose_executor("PagedAdamW", kwargs, params, probe, executors=("cuda",))
    assert only_cuda.executor == "cuda" and "hybrid" in only_cuda.predicted_fraction
    nvme = choose_executor("PagedAdamW", dict(kwargs, store="nvme"), params, probe)
    assert "hybrid" not in nvme.predicted_s  # its host side needs host pages


def test_anchors(base):
    plan = make_plan(workload(params=1e6, dtype="fp32"), synthetic(), base, stores=["cpu"])
    by = {a.name: a.node for a in plan.anchors}
    assert by["torch AdamW"].host == 8 * 1_000_000
    assert by["DeepSpeed ZeRO-2-Offload"].pinned_host == int(1_000_000 * 16 * 1.5)
    assert by["bitsandbytes PagedAdamW8bit"].host == 2 * 1_000_000 + 8 * -(-1_000_000 // 256)


def test_bad_inputs_are_named(base, tmp_path):
    with pytest.raises(PlanError, match="unknown model 'huge'.*built-in sizes"):
        workload("huge")
    with pytest.raises(PlanError, match="not both"):
        workload("small", params=10)
    with pytest.raises(PlanError, match="params must be"):
        workload(params=0)
    with pytest.raises(PlanError, match="dtype must be one of"):
        workload("small", dtype="int8")
    with pytest.raises(PlanError, match="no config.json"):
        workload(str(tmp_path))
    with pytest.raises(PlanError, match="ranks_per_node 8 does not fit this node: it has 4 cores"):
        make_plan(workload("tiny", ranks_per_node=8), synthetic(cores=4), base)


def test_a_meta_param_optimizer_plans_and_cannot_step():
    from offload_engine.optim import PagedAdamW8bit
    p = torch.nn.Parameter(torch.empty(1 << 20, device="meta"))
    opt = PagedAdamW8bit([p], page_size_mb=1)
    assert opt.planned_pages() >= 2 and opt.planned_footprint()[0].host > 0
    p.grad = torch.empty(1 << 20, device="meta")
    with pytest.raises(RuntimeError, match="meta params.*cannot step"):
        opt.step()
    with pytest.raises(RuntimeError, match="meta params"):
        opt.load_state_dict(opt.state_dict())


def test_the_cli_end_to_end(tmp_path, capsys):
    cache = str(tmp_path / "probe.json")
    save_cache(synthetic(tmp_path, cores=2), cache)
    out_json = tmp_path / "chosen.json"
    record = tmp_path / "record.json"
    assert cli.main(["--model", "tiny", "--dtype", "fp32", "--no-probe", "--cache", cache, "--nvme-path",
                     str(tmp_path), "--json", str(out_json), "--verify", "2", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    rec = json.loads(record.read_text())
    first = rec["rows"][0]["configuration"]
    assert "plan for built-in tiny GPT" in out and "torch AdamW" in out and f"choice: {first}" in out
    assert first.split()[1] == "host" and f"verify: {first}" in out and "same  bytes" in out
    chosen = json.loads(out_json.read_text())
    assert load_config(chosen).paging_settings().store == "cpu"
    assert rec["choice"] == chosen and len(rec["rows"]) == 18
    assert rec["verify"]["measured"]["bytes"] == rec["verify"]["predicted"]["bytes"]
    # the engine takes the written config
    import offload_engine
    model = build_model("tiny").module
    engine, opt, _, _ = offload_engine.initialize(model, config=str(out_json))
    assert type(opt).__name__ == rec["rows"][0]["optimizer"]
    opt.close()
    # bad inputs: exit 2, the argument named
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, message in ((["--model", "huge"], "unknown model 'huge'"),
                          (["--params", "lots"], "--params takes a parameter count"),
                          (["--model", "tiny", "--nvme-path", str(blocker / "x")], "nvme_path"),
                          (["--model", "tiny", "--ranks-per-node", "3"], "ranks_per_node 3 does not fit"),
                          (["--model", "tiny", "--config", str(tmp_path / "none.json")], "no such file")):
        assert cli.main(argv + ["--no-probe", "--cache", cache]) == 2, argv
        assert message in capsys.readouterr().err, argv
