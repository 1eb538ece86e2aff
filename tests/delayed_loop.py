"""The training loops of tests/test_overlap_delayed.py (and of its ranks, tests/delayed_job.py):
the engine with paging.overlap "delayed", and the reference written here: the same engine with
overlap off, whose forward and backward are run on the params the delayed semantics say they
read ([Note: delayed update] in offload_engine/engine/delayed.py):

    window t+1 reads the params before step t's update, once step t is past the warm-up;
    the params themselves are updated exactly as without delay.

So the reference keeps a copy of the params taken just before each step past the warm-up,
swaps it in for forward and backward of the next window, and swaps the real params back
before the step. Both loops record, after every step, the params the next forward will read,
and at the end the params with every step applied and the optimizer's state."""
from __future__ import annotations

import torch

import offload_engine
from test_overlap_backward import KB, Net, _batch

CLIP = 20.0  # the grad norm is 2-5 at loss factor 1, 60-150 at 30
# Per step: the loss times this (the steps at 30 clip); None makes a grad inf on that step (skipped).
LOSS_FACTOR = {3: 30.0, 4: 30.0, 8: 30.0, 13: 30.0, 6: None, 11: None}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config(opt_type, precision, gas, store, path, overlap, warmup):
    cfg = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
           "optimizer": {"type": opt_type, "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 6, "warmup_max_lr": 1e-2}},
           "paging": {"overlap": overlap, "page_size_mb": 8 * KB, "store": store,
                      "delayed_warmup_steps": warmup}}
    if opt_type.endswith("8bit"):
        cfg["optimizer"]["params"]["min_8bit_size"] = 64
    if store == "nvme":
        cfg["paging"]["nvme_path"] = str(path)
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 4}
    return cfg


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _load(model, values) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def _sync() -> None:
    """With several ranks, whose params live in one shared-memory file ([Note: shared params]),
    the reference's swaps of the params must not overlap another rank's reads of them."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def train(cfg, steps, gas, dtype, *, reference: bool, warmup: int, rank: int = 0, save=None, resume=None):
    """`steps` optimizer steps of Net; `reference` runs the loop described above on an engine
    with overlap off. `save` = (step, dir): a checkpoint after that step; `resume` = dir: start
    from its latest checkpoint. Returns {"trace": [(params the next forward reads, applied)],
    "final": params, "state": optimizer state_dict}."""
    model = Net()
    engine, optimizer, *_ = offload_engine.initialize(model, cfg)
    first = 0
    if resume is not None:
        engine.load_checkpoint(resume)
        first = engine.global_steps
    poison = {"on": False}
    model.body[0].weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    stale = None  # reference only: the params the delayed engine's next forward would read
    trace = []
    for i in range(first * gas, steps * gas):
        step = i // gas
        factor = LOSS_FACTOR.get(step, 1.0)
        poison["on"] = factor is None and (i + 1) % gas == 0
        x, y = _batch(i + 1000 * rank, dtype, "cpu")
        current = None
        if stale is not None:
            current = _params(model)
            _sync()  # with several ranks the params are shared: every rank is done reading them
            _load(model, stale)
            _sync()
        loss = torch.nn.functional.mse_loss(engine(x, use_side=step % 2 == 0 and step > 0).float(), y)
        engine.backward(loss * (factor or 1.0))
        if current is not None:
            _sync()
            _load(model, current)
            _sync()
        boundary = (i + 1) % gas == 0
        before = _params(model) if reference and boundary else None
        engine.step()
        if boundary:
            if reference:  # step number step+1 past the warm-up: the next window reads `before`
                stale = before if step + 1 > warmup else None
            trace.append((stale if stale is not None else _params(model), engine.was_step_applied()))
            if save is not None and engine.global_steps == save[0]:
                engine.save_checkpoint(save[1])
                stale = None  # a save applies the pending step: the next window reads the params
    if not reference:
        engine.apply_pending_step()
    return {"trace": trace, "final": _params(model), "state": optimizer.state_dict(),
            "delayed": engine.delayed.steps_delayed if engine.delayed is not None else None}


def differences(got, want) -> list[str]:
    from conftest import bits

    out = []
    for step, ((p_got, a_got), (p_want, a_want)) in enumerate(zip(got["trace"], want["trace"], strict=True)):
        if a_got != a_want:
            out.append(f"step {step + 1}: applied {a_got} vs {a_want}")
        out += [f"step {step + 1}: param {k} read by the next forward" for k, (a, b) in enumerate(zip(p_got, p_want))
                if not torch.equal(bits(a), bits(b))]
    out += [f"final param {k}" for k, (a, b) in enumerate(zip(got["final"], want["final"]))
            if not torch.equal(bits(a), bits(b))]
    for key, s in want["state"]["state"].items():
        for name, t in s.items():
            if isinstance(t, torch.Tensor):
                g = got["state"]["state"][key][name]
                same = torch.equal(g, t) if t.element_size() == 1 else torch.equal(bits(g), bits(t))
                if not same:
                    out.append(f"state {key}.{name}")
    return out
