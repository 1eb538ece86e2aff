"""``"auto"`` values without the Hugging Face Trainer.

A config written for the Trainer's DeepSpeed integration carries ``"auto"`` wherever the Trainer
fills a value from its TrainingArguments. With the Trainer, ``offload_engine.hf`` fills them by
transformers' own code. Without it (``initialize()`` or ``load_config`` on the config as it is),
each ``"auto"`` is filled from what the engine knows, with one warning naming the key and the
value it took, or refused naming what is missing:

  batch sizes            dropped, so the other batch keys decide (micro-batch 1 and no
                         accumulation when none is given), as the batch rule does
  optimizer.params.*     the optimizer type's default
  fp16.enabled           false (the Trainer's default: TrainingArguments.fp16 is false)
  scheduler warmup_min_lr   the schedule's default (0)
  scheduler warmup_max_lr   the optimizer's lr where the config gives it, as the Trainer fills it
                            from learning_rate; else the schedule's default
  warmup_num_steps, total_num_steps, gradient_clipping
                         refused: they need the run's length or the Trainer's max_grad_norm,
                         which the engine does not know

``bf16.enabled: "auto"`` keeps the engine's own meaning (bf16 where the hardware runs it fast),
and the DeepSpeed keys that have no effect here drop with their own warning whatever their value.
"""
from __future__ import annotations

AUTO = "auto"
_BATCH = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_NEEDS = {
    "gradient_clipping": "the Trainer's max_grad_norm (1.0 unless set), which the engine does not know: write the "
                         "number (0 for no clipping)",
    "scheduler.params.warmup_num_steps": "the Trainer's warmup_steps or warmup_ratio: write the number of steps",
    "scheduler.params.total_num_steps": "the run's length (the Trainer's max_steps): write the number of steps",
}


def fill_auto(data: dict, problems: list, notes: list) -> set[str]:
    """Fills or refuses the ``"auto"`` values of ``data`` (a private copy), in place (module
    docstring); problems get (path, message), notes the warnings. Returns the refused paths,
    whose keys are gone from ``data`` (so a required one is not reported missing as well)."""
    refused = set()
    for key in _BATCH:
        if data.get(key) == AUTO:
            del data[key]
            notes.append(f"{key} = \"auto\" is derived from the other batch keys (micro-batch 1 and no accumulation "
                         "when none is given); without the Trainer nothing else fills it")
    if data.get("gradient_clipping") == AUTO:
        problems.append(("gradient_clipping", f"\"auto\" needs {_NEEDS['gradient_clipping']}"))
        refused.add("gradient_clipping")
        del data["gradient_clipping"]
    fp16 = data.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") == AUTO:
        fp16["enabled"] = False
        notes.append("fp16.enabled = \"auto\" is false, the Trainer's default (TrainingArguments.fp16)")
    lr = None
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("params"), dict):
        params = optimizer["params"]
        for key in [k for k, v in params.items() if v == AUTO]:
            del params[key]
            notes.append(f"optimizer.params.{key} = \"auto\" takes the optimizer type's default")
        lr = params.get("lr")
    scheduler = data.get("scheduler")
    if isinstance(scheduler, dict) and isinstance(scheduler.get("params"), dict):
        params = scheduler["params"]
        for key in [k for k, v in params.items() if v == AUTO]:
            path = f"scheduler.params.{key}"
            del params[key]
            if path in _NEEDS:
                problems.append((path, f"\"auto\" needs {_NEEDS[path]}"))
                refused.add(path)
            elif key == "warmup_max_lr" and isinstance(lr, (int, float)) and not isinstance(lr, bool):
                params[key] = lr
                notes.append(f"{path} = \"auto\" is the optimizer's lr ({lr!r}), as the Trainer fills it")
            else:
                kind = str(scheduler.get("type", "")).lower()
                notes.append(f"{path} = \"auto\" takes the schedule's default" +
                             (" (the optimizer's lr)" if key == "warmup_max_lr" and kind == "warmuplr" else ""))
    return refused
