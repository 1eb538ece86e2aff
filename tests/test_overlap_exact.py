"""paging.overlap "exact" where the step's scale is known only after backward: gradient
clipping, the fp16 loss scale, and steps skipped for non-finite grads ([Note: overlap with
backward] in engine/overlap.py, [Note: speculative step] in optim/paged_step.py). Pages run
during backward on the guess that the step neither clips nor is skipped; a wrong guess is
taken back from the kept pre-step bytes. Every step, every param and every state tensor must
equal, bit for bit, the same training with overlap off."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload_engine.optim import paged_step
from exact_loop import DTYPES, STEPS, differences as _differences, pair as _pair
from conftest import bits
from multirank import launch_ranks
from test_overlap_backward import Net


@pytest.mark.parametrize("opt_type", ["PagedAdamW", "PagedAdamW8bit"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gas", [1, 3])
@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_exact_equals_the_step_after_backward_through_clipping_and_skips(tmp_path, opt_type, precision, gas, store):
    on, off = _pair(tmp_path, opt_type, precision, gas, store)
    assert _differences(on, off) == []
    applied = [a for _, a, _ in off[0]]
    assert not applied[6] and not applied[15] and sum(applied) >= STEPS - 4  # the poisoned steps are skipped
    outcomes = [o for _, _, o in on[0]]
    spec = on[2]["speculation"]
    # The CPU executor can take pages back on either store, so the guesses are made and checked.
    assert {"kept", "redo", "skipped", "waited"} <= set(outcomes), outcomes
    assert outcomes[4] == "waited"  # step 3 clipped: no guess on the next
    assert spec["kept"] == outcomes.count("kept") and 0 < spec["hit_rate"] < 1
    param_bytes = sum(p.numel() * p.element_size() for p in Net().to(DTYPES[precision]).parameters())
    if store == "cpu":  # host pages: copies of the pages updated early, and of their params' values
        assert 8 * 1024 < spec["peak_kept_bytes"] <= 1024 * 2 ** 20
    else:  # NVMe: their writes stay uncommitted until the step is settled; only params' values are kept
        assert 0 < spec["peak_kept_bytes"] <= param_bytes


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_a_mutant_that_skips_the_restore_is_caught(tmp_path, monkeypatch, store):
    """Without the restore, a redone or skipped step starts from pages already updated once."""
    def forgetful_restore(self):  # everything _restore does but copy the kept bytes back
        self.fed.clear()
        self.restored = True
    monkeypatch.setattr(paged_step._PagedStep, "_restore", forgetful_restore)
    on, off = _pair(tmp_path, "PagedAdamW8bit", "bf16", 1, store)
    assert _differences(on, off) != []


def test_a_mutant_rewind_that_commits_is_caught(tmp_path, monkeypatch):
    """The NVMe store's pages are taken back by not committing them: committing what ran
    early, as a wrong rewind would, makes the redone pages start from updated state."""
    from offload_engine.paging.scheduler import PageScheduler
    rewind = PageScheduler.rewind

    def committing_rewind(self):
        pages = list(self._pages)
        rewind(self)
        self.store.commit(pages)
    monkeypatch.setattr(PageScheduler, "rewind", committing_rewind)
    on, off = _pair(tmp_path, "PagedAdamW", "fp32", 1, "nvme")
    assert _differences(on, off) != []


@pytest.mark.parametrize("budget_pages", [0, 3])
def test_what_is_kept_stays_within_the_budget(tmp_path, budget_pages):
    """Pages past paging.speculation_budget_mb wait for the check; the result is the same."""
    page = 8 * 1024
    budget_mb = budget_pages * 1.5 * page / 2 ** 20  # room for 3 pages with their params' values, or none
    on, off = _pair(tmp_path, "PagedAdamW", "fp32", 1, "cpu", budget_mb=budget_mb)
    assert _differences(on, off) == []
    spec = on[2]["speculation"]
    assert spec["peak_kept_bytes"] <= budget_mb * 2 ** 20
    # The page copies stay for the next steps' reuse: at most what the budget allowed at once.
    assert spec["kept_pool_bytes"] <= spec["peak_kept_bytes"]
    if budget_pages:
        assert spec["peak_kept_bytes"] >= page and spec["kept"] > 0
        assert spec["kept_pool_bytes"] >= page and spec["kept_pool_bytes"] % page == 0
    else:
        assert spec["peak_kept_bytes"] == 0 and spec["kept"] == spec["redo"] == spec["skipped"] == 0
        assert spec["kept_pool_bytes"] == 0
    assert off[2]["speculation"]["kept_pool_bytes"] == 0


def test_kept_page_copies_are_reused_from_step_to_step(tmp_path):
    """Later speculative steps take their page copies from the pool the earlier ones left: every
    buffer ever made is in the pool at the end, and there are no more than one step kept at once."""
    on, _ = _pair(tmp_path, "PagedAdamW", "fp32", 1, "cpu")
    spec = on[2]["speculation"]
    page = on[2]["page_bytes"]
    assert spec["kept"] + spec["redo"] >= 5  # several steps kept pages
    assert spec["kept_buffers_made"] * page == spec["kept_pool_bytes"] > 0
    assert spec["kept_pool_bytes"] <= spec["peak_kept_bytes"]


# ---- several ranks: the grads reach their owners during backward ([Note: reduce during backward]) ----
JOB = Path(__file__).with_name("exact_job.py")
CASES = [f"{opt}:{precision}:{gas}:{store}" for opt in ("PagedAdamW", "PagedAdamW8bit")
         for precision in ("fp32", "bf16", "fp16") for gas in (1, 3) for store in ("cpu", "nvme")]


def _two_ranks(tmp_path, cases, *args, world=2):
    return launch_ranks(JOB, world, tmp_path / "out", "--cases", ",".join(cases), "--dir", tmp_path, *args)


def test_the_graph_names_the_params_backward_reaches():
    """Params unused by the forward are not reached; a custom autograd.Function (reentrant
    checkpointing) makes the graph unreadable: None, so no param is taken as unreached."""
    import torch.utils.checkpoint as checkpoint
    from offload_engine.engine.bucket_reduce import params_reached
    first, second, unused = (torch.nn.Linear(3, 3) for _ in range(3))
    x = torch.randn(2, 3, requires_grad=True)
    reached = params_reached(second(first(x)).sum())
    assert {id(p) for p in (*first.parameters(), *second.parameters())} == reached - {id(x)}
    assert not {id(p) for p in unused.parameters()} & reached
    assert params_reached(checkpoint.checkpoint(lambda t: second(first(t)), x, use_reentrant=True).sum()) is None
    reached = params_reached(checkpoint.checkpoint(lambda t: second(first(t)), x, use_reentrant=False).sum())
    assert {id(p) for p in first.parameters()} <= reached


# Shared-memory params (the default on one host) take the whole grid; the gloo transport (several
# hosts, or data_parallel.shared_memory false) a quarter of it.
GLOO_CASES = [c for c in CASES if c.endswith((":bf16:3:cpu", ":fp16:1:nvme", ":fp32:3:nvme"))]


@pytest.mark.parametrize("shared_memory", ["on", "off", "two-hosts"])
def test_two_ranks_exact_equals_the_step_after_backward(tmp_path, shared_memory):
    """The grid at 2 ranks: each rank's own micro-batches, an inf grad on rank 0 only (every
    rank must skip), a param with a grad on one rank only; every param on both ranks and
    every state tensor of each rank's shards, bit for bit, against overlap off. two-hosts:
    4 ranks reported as 2 hosts x 2 ([Note: hierarchical exchange]), a quarter of the grid."""
    cases = CASES if shared_memory == "on" else GLOO_CASES
    if shared_memory == "two-hosts":
        ranks = _two_ranks(tmp_path, cases, "--fake-hosts", 2, world=4)
    else:
        ranks = _two_ranks(tmp_path, cases, "--shared-memory", shared_memory)
    for case in cases:
        both = [r[case] for r in ranks]
        for rank, got in enumerate(both):
            assert got["differences"] == [], (case, rank)
            assert not got["applied"][6] and not got["applied"][15] and sum(got["applied"]) >= STEPS - 4, case
            assert {"kept", "redo", "skipped"} <= set(got["outcomes"]), (case, rank, got["outcomes"])
            # Buckets went to their owners while backward ran, and pages were updated then.
            assert all(buckets == 3 for _, buckets in got["during"]), (case, rank, got["during"])
        assert any(pages > 0 for got in both for pages, _ in got["during"]), case
        for other in both[1:]:
            assert both[0]["applied"] == other["applied"] and both[0]["outcomes"] == other["outcomes"], case
            for a, b in zip(both[0]["params"], other["params"], strict=True):
                assert torch.equal(bits(a), bits(b)), case


def test_two_ranks_an_opaque_graph_waits_for_unused_params_and_stays_exact(tmp_path):
    """Where the graph cannot say which params backward reaches, a param with no grad holds its
    bucket until engine.step(): on the steps where `side` is unused, the first bucket (and so
    every bucket: they go in order) is exchanged after backward. Still bit for bit."""
    case = "PagedAdamW:bf16:1:cpu"
    ranks = _two_ranks(tmp_path, [case], "--graph", "opaque")
    for got in (r[case] for r in ranks):
        assert got["differences"] == []
        buckets = [b for _, b in got["during"]]
        assert all(buckets[step] == 0 for step in (1, 3, 7, 9)), buckets  # side unused on both ranks
        assert all(buckets[step] == 3 for step in (2, 4, 8, 10)), buckets


@pytest.mark.parametrize("mutant", ["skip-restore", "own-grads"])
def test_two_ranks_mutants_are_caught(tmp_path, mutant):
    """skip-restore: a redone or skipped step starts from pages already updated once;
    own-grads: an owner updates its pages on its own grads, not the ranks' average."""
    ranks = _two_ranks(tmp_path, ["PagedAdamW8bit:bf16:1:cpu"], "--mutant", mutant)
    assert any(r["PagedAdamW8bit:bf16:1:cpu"]["differences"] for r in ranks)
