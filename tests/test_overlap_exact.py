"""paging.overlap "exact" where the step's scale is known only after backward: gradient
clipping, the fp16 loss scale, and steps skipped for non-finite grads ([Note: overlap with
backward] in engine/overlap.py, [Note: speculative step] in optim/paged_step.py). Pages run
during backward on the guess that the step neither clips nor is skipped; a wrong guess is
taken back from the kept pre-step bytes. Every step, every param and every state tensor must
equal, bit for bit, the same training with overlap off."""
from __future__ import annotations

import pytest
import torch

import offload_engine
from offload_engine.optim import paged_step
from test_overlap_backward import KB, Net, _batch
from conftest import bits

STEPS = 20
CLIP = 20.0  # the grad norm is 2-5 at loss factor 1, 60-150 at 30
# Per step: the loss is multiplied by this, so the grad norm is far above CLIP on some steps
# (those clip: the guess fails and the early pages are redone) and far below on the others;
# None makes the first layer's grad inf (its grad comes last, after the other pages ran early).
LOSS_FACTOR = {3: 30.0, 4: 30.0, 8: 30.0, 13: 30.0, 14: 30.0, 17: 30.0, 6: None, 15: None}


def _config(opt_type, precision, gas, store, path, overlap, budget_mb=None):
    cfg = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
           "optimizer": {"type": opt_type, "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "paging": {"overlap": overlap, "page_size_mb": 8 * KB, "store": store}}
    if opt_type.endswith("8bit"):
        cfg["optimizer"]["params"]["min_8bit_size"] = 64
    if store == "nvme":
        cfg["paging"]["nvme_path"] = str(path)
    if budget_mb is not None:
        cfg["paging"]["speculation_budget_mb"] = budget_mb
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 4}
    return cfg


def _train(cfg, gas, dtype):
    model = Net()
    engine, optimizer, *_ = offload_engine.initialize(model, cfg)
    poison = {"on": False}
    model.body[0].weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    trace = []
    for i in range(STEPS * gas):
        step = i // gas
        factor = LOSS_FACTOR.get(step, 1.0)
        poison["on"] = factor is None and (i + 1) % gas == 0
        x, y = _batch(i, dtype, "cpu")
        loss = torch.nn.functional.mse_loss(engine(x, use_side=step % 2 == 0 and step > 0).float(), y)
        engine.backward(loss * (factor or 1.0))
        engine.step()
        if (i + 1) % gas == 0:
            trace.append(([p.detach().clone() for p in model.parameters()], engine.was_step_applied(),
                          engine.overlap.last_outcome if engine.overlap is not None else None))
    return trace, optimizer.state_dict(), optimizer.paging_stats()


def _differences(on, off) -> list[str]:
    out = []
    for step, ((params_on, applied_on, _), (params_off, applied_off, _)) in enumerate(zip(on[0], off[0], strict=True)):
        if applied_on != applied_off:
            out.append(f"step {step}: applied {applied_on} vs {applied_off}")
        out += [f"step {step}: param {k}" for k, (a, b) in enumerate(zip(params_on, params_off))
                if not torch.equal(bits(a), bits(b))]
    for key, s in off[1]["state"].items():
        for name, t in s.items():
            if isinstance(t, torch.Tensor):
                got = on[1]["state"][key][name]
                same = torch.equal(got, t) if t.element_size() == 1 else torch.equal(bits(got), bits(t))
                if not same:
                    out.append(f"state {key}.{name}")
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _pair(tmp_path, opt_type, precision, gas, store, **kw):
    return [_train(_config(opt_type, precision, gas, store, tmp_path / overlap, overlap, **kw), gas, DTYPES[precision])
            for overlap in ("exact", "off")]


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
    if budget_pages:
        assert spec["peak_kept_bytes"] >= page and spec["kept"] > 0
    else:
        assert spec["peak_kept_bytes"] == 0 and spec["kept"] == spec["redo"] == spec["skipped"] == 0
