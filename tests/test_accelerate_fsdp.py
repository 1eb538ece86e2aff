"""accelerate with FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``), 2 CPU ranks over
gloo: ``Accelerator.prepare(model, optimizer)`` swaps the params for DTensor shards after our
optimizer was built on the plain ones. Our paged and 8-bit optimizers train on through that:
the fp32 paged one equal to torch AdamW in the same job, the 8-bit ones equal to the same loop
run unsharded in one process, and every rank holding the same full params."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from multirank import launch_ranks
from tolerances import TRAINED_VS_TORCH

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs accelerate")

JOB = Path(__file__).parent / "accelerate_fsdp_job.py"
NAMES = ("torch.AdamW", "PagedAdamW", "PagedAdamW8bit", "AdamW8bit")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch_ranks(JOB, 2, tmp_path_factory.mktemp("acc") / "run", "--names", *NAMES)


def _unsharded(name):
    """The job's loop on the plain model in this process: no FSDP, no accelerate."""
    import accelerate_fsdp_job as job
    model = job._model()
    opt = job._optimizer(name, model.parameters())
    trajectory = []
    for step in range(job.STEPS):
        x, y = job._batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    if hasattr(opt, "close"):
        opt.close()
    return trajectory


def test_every_rank_holds_the_same_params(ranks):
    for name in NAMES:
        for a, b in zip(ranks[0][name], ranks[1][name]):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), name


def test_paged_fp32_trains_as_torch_adamw_through_prepare(ranks):
    tol = TRAINED_VS_TORCH[torch.float32]
    for step, (ours, theirs) in enumerate(zip(ranks[0]["PagedAdamW"], ranks[0]["torch.AdamW"])):
        for x, y in zip(ours, theirs):
            torch.testing.assert_close(x, y, rtol=tol.rtol, atol=tol.atol, msg=f"step {step}")


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "AdamW8bit", "torch.AdamW"])
def test_sharded_by_accelerate_equals_the_unsharded_loop(ranks, name):
    """The 8-bit blocks follow the full param, not the shard, so sharding changes nothing."""
    for step, (ours, plain) in enumerate(zip(ranks[0][name], _unsharded(name))):
        for x, y in zip(ours, plain):
            assert torch.equal(x, y), (name, step)
