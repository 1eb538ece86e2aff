"""A torch.profiler trace of a paged step shows its phases by name: offload_engine::fetch,
::update and ::writeback for a store read through slots; ::update alone for host pages updated
in place. (::grad_reduce and ::param_gather: tests/test_data_parallel.py, 2 ranks.)"""
from __future__ import annotations

import pytest
import torch

from offload_engine.optim import PagedAdamW8bit

PHASES = {f"offload_engine::{name}" for name in ("fetch", "update", "writeback", "grad_reduce", "param_gather")}


def _labels_of_a_step(**options) -> list[str]:
    p = torch.nn.Parameter(torch.randn(70_001))
    opt = PagedAdamW8bit([p], page_size_mb=1 / 16, min_8bit_size=0, **options)
    p.grad = torch.randn_like(p)
    opt.step()  # the first step lays the pages out; the second is the one profiled
    p.grad = torch.randn_like(p)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    pages = opt.paging_stats()["num_pages"]
    opt.close()
    names = [e.name for e in prof.events() if e.name in PHASES]  # (the kernels' ops share the namespace)
    assert pages > 1 and names.count("offload_engine::update") == pages  # one label per page
    return sorted(set(names))


@pytest.mark.parametrize("store, expected", [
    ("cpu", ["offload_engine::update"]),
    ("nvme", ["offload_engine::fetch", "offload_engine::update", "offload_engine::writeback"])])
def test_a_paged_step_labels_its_phases(tmp_path, store, expected):
    options = {"store": store, "nvme_path": str(tmp_path)} if store == "nvme" else {}
    assert _labels_of_a_step(**options) == expected
