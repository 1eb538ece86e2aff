"""The ``scheduler`` section: DeepSpeed's warmup schedules, with DeepSpeed's parameter names and
defaults (deepspeed/runtime/lr_schedules.py). This module validates the settings only; the
schedules themselves are offload_engine/schedulers.py.

Where this is stricter than DeepSpeed (as offload_engine/schedulers.py is): an unknown
``warmup_type`` is an error (DeepSpeed logs a warning and falls back to ``log``), so is a
``total_num_steps`` below ``warmup_num_steps`` (resolve.py; DeepSpeed warns), and lrs must be
finite and >= 0, ratios in [0, 1]. More lenient: ``warmup_num_steps`` 0 (the Hugging Face
Trainer's default warmup) warms up over 2 steps, as DeepSpeed before 0.19.6 did, with a warning
(loader.py); DeepSpeed 0.19.6 and later refuse it.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, PlainValidator, create_model

from .base import NonNegativeInt, PositiveInt, Section

__all__ = ["DEEPSPEED_ONLY_SCHEDULERS", "SCHEDULER_PARAMS_MODELS", "SCHEDULER_SECTIONS", "SCHEDULER_SUMMARIES"]


def _lr_or_list(value):
    """A learning rate, or one per param group: a finite number >= 0 or a non-empty list of them."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError("must be a number >= 0 or a non-empty list of them (one per param group), got []")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not _finite(item) or item < 0:
            raise ValueError(f"must be a finite number >= 0 or a list of them (one per param group), got {item!r}")
    return [float(v) for v in value] if isinstance(value, list) else float(value)


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


LrOrList = Annotated[float | list[float], PlainValidator(_lr_or_list)]
WarmupType = Literal["log", "linear"]

_FIELDS = {
    "warmup_min_lr": (LrOrList, ("Learning rate at step 0 of the warmup (a number, or a list with one per param "
                                 "group).")),
    "warmup_max_lr": (LrOrList | None, ("Learning rate reached at the end of the warmup (a number or a list per "
                                        "param group).")),
    "warmup_num_steps": (NonNegativeInt, ("Number of warmup steps (an int >= 0; as in DeepSpeed, fewer than 2 act "
                                          "as 2).")),
    "last_batch_iteration": (Annotated[int, Field(ge=-1)], ("The index of the last batch already trained: -1 starts "
                                                            "the schedule from the beginning, k >= 0 resumes it "
                                                            "after step k (the optimizer's lrs are left alone), as "
                                                            "DeepSpeed's schedules do.")),
    "warmup_type": (WarmupType, "Shape of the warmup: 'log' (logarithmic, DeepSpeed's default) or 'linear'."),
    "total_num_steps": (PositiveInt, ("Total number of training steps (optimizer steps), at least "
                                      "warmup_num_steps; required.")),
    "warmup_min_ratio": (Annotated[float, Field(ge=0.0, le=1.0)], ("Start of the warmup as a fraction of the "
                                                                   "optimizer's lr, in [0, 1].")),
    "cos_min_ratio": (Annotated[float, Field(ge=0.0, le=1.0)], ("End of the cosine decay as a fraction of the "
                                                                "optimizer's lr, in [0, 1].")),
}

_REQUIRED = ...
_DEFAULTS: dict[str, dict] = {
    # DeepSpeed's WarmupLR: warmup_max_lr None means "the optimizer's lr" (DeepSpeed >= 0.14).
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000, "warmup_type": "log",
                 "last_batch_iteration": -1},
    "WarmupDecayLR": {"total_num_steps": _REQUIRED, "warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                          "warmup_type": "log", "last_batch_iteration": -1},
    "WarmupCosineLR": {"total_num_steps": _REQUIRED, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                           "cos_min_ratio": 0.0001, "warmup_type": "log", "last_batch_iteration": -1},
}

SCHEDULER_SUMMARIES = {
    "WarmupLR": "warm up from warmup_min_lr to warmup_max_lr over warmup_num_steps, then hold",
    "WarmupDecayLR": "WarmupLR, then decay linearly to 0 at total_num_steps",
    "WarmupCosineLR": "warm up from warmup_min_ratio * lr to lr, then cosine decay to cos_min_ratio * lr at "
                      "total_num_steps",
}

# DeepSpeed schedules this package does not provide.
DEEPSPEED_ONLY_SCHEDULERS = ("OneCycle", "LRRangeTest")


def _params_model(name: str) -> type[Section]:
    fields = {}
    for key, default in _DEFAULTS[name].items():
        annotation, description = _FIELDS[key]
        if key == "warmup_max_lr" and default is None:
            description += " null = the optimizer's lr (DeepSpeed's default)."
        extra = None
        if key in ("warmup_min_lr", "warmup_max_lr"):
            allowed = "a number >= 0 or a non-empty list of them (one per param group)"
            extra = {"allowed": allowed if default is not None else f"null, {allowed}"}
        fields[key] = (annotation, Field(default, description=description, json_schema_extra=extra))
    model = create_model(f"{name}Params", __base__=Section, **fields)
    model.__doc__ = f"params of scheduler type {name}: {SCHEDULER_SUMMARIES[name]}."
    return model


def _section_model(name: str, params: type[Section]) -> type[Section]:
    required = any(d is _REQUIRED for d in _DEFAULTS[name].values())
    params_field = Field(description=f"Settings of {name}.") if required else \
        Field(default_factory=params, description=f"Settings of {name}.")
    model = create_model(f"{name}Section", __base__=Section,
                         type=(Literal[name], Field(description="Scheduler type (case-insensitive).")),
                         params=(params, params_field))
    model.__doc__ = f"scheduler section with type {name}."
    return model


SCHEDULER_PARAMS_MODELS: dict[str, type[Section]] = {name: _params_model(name) for name in _DEFAULTS}
SCHEDULER_SECTIONS: dict[str, type[Section]] = {name: _section_model(name, model)
                                                for name, model in SCHEDULER_PARAMS_MODELS.items()}
