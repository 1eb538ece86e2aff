"""The Hugging Face Trainer with an engine config: ``trainer_optimizers`` gives the Trainer this
package's optimizer and schedule from a DeepSpeed-style config, ``"auto"`` values included.

The ``"auto"`` values are filled by transformers' own code for DeepSpeed configs
(``HfTrainerDeepSpeedConfig.trainer_config_process`` and ``trainer_config_finalize``), so they
take exactly the values a DeepSpeed run of the same Trainer would get (lr, betas, eps and weight
decay from ``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``; the
schedule's warmup and total steps; batch sizes, accumulation, clipping and precision), and a
value given in both places that disagrees is transformers' error. The Trainer then runs the
loop as with any optimizer passed through ``optimizers=``: it clips (``max_grad_norm``), scales
for fp16/bf16 and saves ``optimizer.state_dict()`` in its checkpoints, which resume bit for bit.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from . import optim
from .config import load_config
from .schedulers import build_scheduler

__all__ = ["trainer_optimizers"]


def trainer_optimizers(config: str | os.PathLike | dict, model: torch.nn.Module, args: Any,
                       num_training_steps: int | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """``(optimizer, lr_scheduler)`` for ``transformers.Trainer(..., optimizers=...)``.

    config: an engine config (a path to JSON or a dict) with an ``optimizer`` section; its
    ``"auto"`` values are filled from ``args`` (``TrainingArguments``) as the Trainer fills a
    DeepSpeed config. model: the model the Trainer trains (its trainable params are optimized).
    num_training_steps: the optimizer steps of the run, for a schedule's ``total_num_steps``;
    None takes ``args.max_steps`` and is refused, naming both, where that is not set either
    and the config needs it. The scheduler is None when the config has no scheduler section
    (the Trainer then builds one from ``args``)."""
    try:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    except ImportError as exc:
        raise ImportError("trainer_optimizers needs transformers (pip install transformers)") from exc
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            raw = json.load(f)
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)  # transformers fills the dict in place
    else:
        raise TypeError(f"trainer_optimizers: config must be a path or a dict, got {type(config).__name__}")
    if num_training_steps is None and getattr(args, "max_steps", -1) > 0:
        num_training_steps = args.max_steps
    if num_training_steps is None and "auto" in json.dumps(raw.get("scheduler", {})):
        raise ValueError("trainer_optimizers: the scheduler has \"auto\" values that need the run's length: pass "
                         "num_training_steps= or set TrainingArguments.max_steps")
    filler = HfTrainerDeepSpeedConfig(raw)
    filler.trainer_config_process(args)
    filler.trainer_config_finalize(args, model, num_training_steps or 0)
    cfg = load_config(filler.config)
    # The Trainer's params stay fp32 under its autocast, so the optimizer is built as for fp32 params.
    spec = cfg.optimizer_spec(param_dtype_is_fp32=True)
    if spec is None:
        raise ValueError("trainer_optimizers: the config has no optimizer section; add one (its type and params, "
                         "\"auto\" allowed), or let the Trainer build its own optimizer")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = getattr(optim, spec.name)(params, **spec.kwargs)
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = build_scheduler(optimizer, cfg.scheduler.type, cfg.scheduler.params.model_dump())
    return optimizer, scheduler
