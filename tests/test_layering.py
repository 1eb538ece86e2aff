"""Layers talk through public interfaces: outside paging/ and optim/, no module of the package
reads or writes a private attribute of an optimizer, a pager, a store or a pipeline; the slot
rule lives in paging/footprint.py alone; every store and pipeline has its Protocol's members."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.paging import footprint
from offload_engine.paging.protocols import PagePipeline, PageStore

PACKAGE = Path(offload_engine.__file__).parent
# An attribute access `x._name` (not `self._name`, not a dunder) on something that names an
# optimizer, a pager, a store or a pipeline.
REACH = re.compile(r"\b(\w*(?:opt|optimizer|pager|store|scheduler|pipeline)\w*)\._(?!_)[a-z]\w*")
ALLOWED = {"optimizer._param_groups"}  # none today; torch's own private names would go here


def _offenders(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("paging/", "optim/")):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith(("from ", "import ")):
                continue  # module imports (optim._base) are not attribute access
            for m in REACH.finditer(line.split("#", 1)[0]):
                if m.group(1) != "self" and m.group(0) not in ALLOWED:
                    found.append(f"{rel}:{n}: {m.group(0)}")
    return found


def test_no_module_outside_paging_and_optim_reaches_into_private_attributes():
    assert _offenders(PACKAGE) == []


def test_the_check_catches_a_reach_through(tmp_path, monkeypatch):
    """The grep is not vacuous: a module that reads optimizer._keys is reported."""
    bad = PACKAGE / "engine" / "_layering_probe.py"
    bad.write_text("def f(optimizer):\n    return optimizer._keys\n")
    try:
        assert _offenders(PACKAGE) == ["engine/_layering_probe.py:2: optimizer._keys"]
    finally:
        bad.unlink()


def test_the_slot_rule_appears_once():
    """`prefetch_depth + N` and `buffer_count - N` are computed in footprint.py only (the
    code, not prose); everyone else asks it."""
    import ast

    places = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) \
                    and isinstance(node.right, ast.Constant) and isinstance(node.right.value, int):
                left = node.left
                name = left.id if isinstance(left, ast.Name) else getattr(left, "attr", None)
                if name in ("prefetch_depth", "buffer_count"):
                    places.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}")
    assert places and all(p.startswith("paging/footprint.py:") for p in places), places


@pytest.mark.parametrize("store, executor, k, host, device", [
    ("cpu", "cpu", 2, 0, 0), ("cpu", "cuda", 2, 0, 4), ("nvme", "cpu", 2, 4, 0), ("nvme", "cuda", 3, 6, 5),
    ("managed", "cuda", 2, 0, 0)])
def test_slot_rule(store, executor, k, host, device):
    s = footprint.slots(store, executor, k)
    assert (s.host, s.device) == (host, device)
    assert footprint.prefetch_depth_for_buffer_count(footprint.slots("nvme", "cpu", k).host) == k


def test_the_optimizer_pool_and_the_admission_figures_follow_the_rule(tmp_path):
    from offload_engine.engine.admission import state_bytes
    from offload_engine.optim import PagedAdamW

    params = [torch.nn.Parameter(torch.randn(5000)) for _ in range(3)]
    opt = PagedAdamW(params, store="nvme", nvme_path=str(tmp_path), page_size_mb=1 / 64, prefetch_depth=3)
    host, disk, _ = state_bytes(opt)  # before any layout: all of it still to come
    planned, _ = opt.planned_footprint()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    stats = opt.paging_stats()
    assert stats["pool_slots"] == footprint.slots("nvme", "cpu", 3).host
    assert host == stats["pool_bytes"] == planned.host and disk == stats["store_bytes"] == planned.disk
    assert state_bytes(opt)[:2] == (0, 0)  # all allocated now
    assert stats["footprint"] == planned.as_dict()


def test_every_store_and_pipeline_has_its_protocols_members(tmp_path):
    from offload_engine.paging import HostStore, NvmeStore, PageScheduler

    for store in (HostStore(4096), NvmeStore(4096, str(tmp_path))):
        assert isinstance(store, PageStore), type(store).__name__
        store.close()
    assert isinstance(PageScheduler(HostStore(4096), None, 2), PagePipeline)
