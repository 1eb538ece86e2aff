"""paging.overlap "delayed": step t's update runs during step t+1's forward and backward, which
read the params before step t ([Note: delayed update] in engine/delayed.py). Checked against the
reference loop of tests/delayed_loop.py, bit for bit, after every step: the params the next
forward reads, whether the step was applied, and at the end every param and state tensor;
through clipping, fp16 overflow and non-finite skips, accumulation, both stores and formats."""
from __future__ import annotations

import pytest
import torch

import offload_engine
from offload_engine.config import ConfigError
from offload_engine.engine import delayed as delayed_module
from delayed_loop import DTYPES, config, differences, train
from multirank import launch_ranks
from pathlib import Path

STEPS = 14
WARMUP = 3


def _pair(tmp_path, opt_type, precision, gas, store, warmup=WARMUP, steps=STEPS):
    dtype = DTYPES[precision]
    return [train(config(opt_type, precision, gas, store, tmp_path / name, overlap, warmup), steps, gas, dtype,
                  reference=name == "reference", warmup=warmup)
            for name, overlap in (("delayed", "delayed"), ("reference", "off"))]


@pytest.mark.parametrize("opt_type", ["PagedAdamW", "PagedAdamW8bit"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gas", [1, 3])
@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_delayed_follows_the_reference_loop(tmp_path, opt_type, precision, gas, store):
    got, want = _pair(tmp_path, opt_type, precision, gas, store)
    assert differences(got, want) == []
    applied = [a for _, a in want["trace"]]
    assert not applied[6] and not applied[11]  # the poisoned steps are skipped, the others not (but fp16's)
    # every applied step past the warm-up was delayed (fp16 may skip more on overflow)
    assert got["delayed"] == sum(applied[WARMUP:]) > 0


def test_the_warmup_steps_are_the_undelayed_steps(tmp_path):
    """With the warm-up covering every step, delayed is overlap off."""
    got, _ = _pair(tmp_path, "PagedAdamW8bit", "bf16", 1, "cpu", warmup=STEPS)
    off = train(config("PagedAdamW8bit", "bf16", 1, "cpu", None, "off", 0), STEPS, 1, torch.bfloat16,
                reference=False, warmup=0)
    assert differences(got, off) == [] and got["delayed"] == 0


def test_a_mutant_whose_forward_reads_the_new_params_is_caught(tmp_path, monkeypatch):
    """Applying the update at once (no staleness) is the undelayed step: not the semantics."""
    launch = delayed_module.DelayedUpdate.launch

    def eager(self, grad_scale):
        launch(self, grad_scale)
        self.wait()
        self.apply()
    monkeypatch.setattr(delayed_module.DelayedUpdate, "launch", eager)
    got, want = _pair(tmp_path, "PagedAdamW", "fp32", 1, "cpu")
    assert differences(got, want) != []


def test_a_mutant_that_drops_the_update_is_caught(tmp_path, monkeypatch):
    """A pending update never copied into the params."""
    apply = delayed_module.DelayedUpdate.apply

    def dropping(self):
        if self._pending is not None and self.steps_delayed == 2:
            self._pending = None
            return False
        return apply(self)
    monkeypatch.setattr(delayed_module.DelayedUpdate, "apply", dropping)
    got, want = _pair(tmp_path, "PagedAdamW", "fp32", 1, "cpu")
    assert differences(got, want) != []


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_a_checkpoint_flushes_the_pending_step_and_resumes_exactly(tmp_path, store):
    """Saving after step 7 applies step 7's update first; a run resumed from that checkpoint
    then ends bit for bit where the run that saved it ends."""
    cfg = config("PagedAdamW8bit", "bf16", 1, store, tmp_path / "a", "delayed", WARMUP)
    through = train(cfg, STEPS, 1, torch.bfloat16, reference=False, warmup=WARMUP, save=(7, tmp_path / "ckpt"))
    cfg_b = config("PagedAdamW8bit", "bf16", 1, store, tmp_path / "b", "delayed", WARMUP)
    resumed = train(cfg_b, STEPS, 1, torch.bfloat16, reference=False, warmup=WARMUP, resume=tmp_path / "ckpt")
    assert len(resumed["trace"]) == STEPS - 7
    tail = {**through, "trace": through["trace"][7:]}
    assert differences(resumed, tail) == []
    # and the save did apply step 7: the reference that flushes at the same point agrees
    cfg_r = config("PagedAdamW8bit", "bf16", 1, store, tmp_path / "r", "off", WARMUP)
    reference = train(cfg_r, STEPS, 1, torch.bfloat16, reference=True, warmup=WARMUP, save=(7, tmp_path / "ckpt_r"))
    assert differences(through, reference) == []


def test_an_error_in_the_delayed_step_surfaces_at_the_next_boundary(tmp_path, monkeypatch):
    """The step's thread fails: the next engine.step() raises its error, and the params stay
    those before the failed step (its shadows are never applied)."""
    from offload_engine.optim import paged_step

    close = paged_step._PagedStep.close
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk gone")
        return close(self)
    monkeypatch.setattr(paged_step._PagedStep, "close", failing)
    from test_overlap_backward import Net, _batch
    model = Net()
    engine, *_ = offload_engine.initialize(model, config("PagedAdamW", "fp32", 1, "cpu", None, "delayed", 0))
    before = None
    with pytest.raises(OSError, match="disk gone"):
        for i in range(4):
            x, y = _batch(i, torch.float32, "cpu")
            engine.backward(torch.nn.functional.mse_loss(engine(x, use_side=False), y))
            before = [p.detach().clone() for p in model.parameters()]
            engine.step()
    assert i == 2  # step 2 failed on its thread; step 3's boundary reported it
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_delayed_needs_a_paged_optimizer_on_the_cpu_executor():
    from test_overlap_backward import Net
    cfg = config("AdamW", "fp32", 1, "cpu", None, "delayed", 0)
    for key in ("store", "page_size_mb"):
        del cfg["paging"][key]
    with pytest.raises(ConfigError, match="paging.overlap.*'delayed' needs a paged optimizer"):
        offload_engine.initialize(Net(), cfg)
    with pytest.raises(ConfigError, match="paging.overlap"):
        offload_engine.initialize(Net(), {**cfg, "paging": {"overlap": "late"}})


JOB = Path(__file__).with_name("delayed_job.py")


@pytest.mark.parametrize("opt_type, store, shared", [("PagedAdamW8bit", "cpu", "on"), ("PagedAdamW", "nvme", "on"),
                                                     ("PagedAdamW8bit", "nvme", "off")])
def test_two_ranks_delayed_follow_the_reference_loop(tmp_path, opt_type, store, shared):
    """At world 2 (gloo; params in shared memory, or each rank's own with the updated slices
    broadcast): each rank's trace equals the reference loop's run at world 2, bit for bit,
    and the ranks agree."""
    ranks = launch_ranks(JOB, 2, tmp_path / "job", "--optimizer", opt_type, "--store", store,
                         "--steps", 10, "--dir", tmp_path, "--shared-memory", shared)
    for r in ranks:
        assert r["differences"] == [], r["differences"]
        assert r["delayed"] > 0
    no_state = {"state": {}}  # each rank holds the state of its own partition
    assert differences({**ranks[0]["got"], "state": no_state}, {**ranks[1]["got"], "state": no_state}) == []
