"""The training loop of tests/test_overlap_exact.py (and of its ranks, tests/exact_job.py): the
engine with paging.overlap "exact" or "off" on the same micro-batches, where the step's scale is
known only after backward: the grad norm crosses gradient_clipping on some steps, a grad is
inf on others (on rank 0 only, with several ranks), fp16 loss scales move. Each run records,
after every step, every param, whether the step was applied and the overlap's outcome; at the
end, the optimizer's state and paging_stats()."""
from __future__ import annotations

import torch

import offload_engine
from test_overlap_backward import KB, Net, _batch
from conftest import bits

STEPS = 20
CLIP = 20.0  # the grad norm is 2-5 at loss factor 1, 60-150 at 30
# Per step: the loss is multiplied by this, so the grad norm is far above CLIP on some steps
# (those clip: the guess fails and the early pages are redone) and far below on the others;
# None makes the first layer's grad inf (its grad comes last, after the other pages ran early).
LOSS_FACTOR = {3: 30.0, 4: 30.0, 8: 30.0, 13: 30.0, 14: 30.0, 17: 30.0, 6: None, 15: None}


def config(opt_type, precision, gas, store, path, overlap, budget_mb=None):
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


def train(cfg, gas, dtype, rank=0, world=1):
    model = Net()
    engine, optimizer, *_ = offload_engine.initialize(model, cfg)
    poison = {"on": False}
    model.body[0].weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    trace, during = [], []  # during: per step, pages updated and buckets reduced before engine.step()
    for i in range(STEPS * gas):
        step = i // gas
        factor = LOSS_FACTOR.get(step, 1.0)
        poison["on"] = factor is None and (i + 1) % gas == 0 and rank == 0  # one rank's inf skips every rank's step
        x, y = _batch(i * world + rank, dtype, "cpu")  # each rank its own micro-batches
        # `side` gets no grad on odd steps; on step 5 a grad on rank 1 only (zeros stand in on rank 0)
        use_side = (step % 2 == 0 and step > 0) or (step == 5 and rank == 1)
        loss = torch.nn.functional.mse_loss(engine(x, use_side=use_side).float(), y)
        engine.backward(loss * (factor or 1.0))
        engine.step()
        if (i + 1) % gas == 0:
            trace.append(([p.detach().clone() for p in model.parameters()], engine.was_step_applied(),
                          engine.overlap.last_outcome if engine.overlap is not None else None))
            if engine.overlap is not None:
                reducer = engine.overlap.reducer
                during.append((engine.overlap.pages_in_backward,
                               reducer.buckets_in_backward if reducer is not None else None))
    return trace, optimizer.state_dict(), optimizer.paging_stats(), during


def differences(on, off) -> list[str]:
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


def pair(tmp_path, opt_type, precision, gas, store, **kw):
    return [train(config(opt_type, precision, gas, store, tmp_path / overlap, overlap, **kw), gas, DTYPES[precision])
            for overlap in ("exact", "off")]
