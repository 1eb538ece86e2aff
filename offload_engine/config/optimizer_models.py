"""The ``optimizer`` section: which optimizer types a config may name, what each one means
(algorithm, decoupled weight decay, state format, paged or not) and the ``params`` each accepts.

Two families of names:
  * DeepSpeed's names (``Adam``, ``AdamW``, ``Lion``) keep DeepSpeed's meaning, defaults
    included: ``Adam`` is AdamW unless ``adam_w_mode`` is false, and weight decay defaults to 0.
  * This package's class names (``CPUAdam``, ``AdamW8bit``, ``PagedAdamW8bit``, ...) keep the
    class's meaning and constructor defaults; their ``params`` are constructor keywords.
Names match case-insensitively (``adamw`` is ``AdamW``), as in DeepSpeed.

Which class is finally built (a paged one when a page store is configured, an 8-bit one for
``paging.state_dtype: int8``, ...) is decided in resolve.py; this module only describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, create_model

from .base import Betas, BlockSize, NonNegativeFloat, NonNegativeInt, Section

__all__ = [
    "DEEPSPEED_ONLY_OPTIMIZERS",
    "ENGINE_OWNED_PARAMS",
    "OPTIMIZER_KINDS",
    "OPTIMIZER_SECTIONS",
    "PARAMS_MODELS",
    "OptimizerKind",
]


@dataclass(frozen=True)
class OptimizerKind:
    """What an optimizer type name means."""

    name: str
    algorithm: str                 # "adam" | "lion"
    adamw: bool | None          # decoupled weight decay; None: from params (adam_w_mode / adamw_mode)
    state_dtype: str | None     # fixed by the name, or None: paging.state_dtype (fp32 when unset)
    paged: bool                    # True: always paged; False: paged only when a page store is configured
    deepspeed: bool                # a DeepSpeed name: DeepSpeed's defaults and meaning
    summary: str


def _kind(name, algorithm, adamw, state_dtype, paged, deepspeed, summary):
    return OptimizerKind(name, algorithm, adamw, state_dtype, paged, deepspeed, summary)


OPTIMIZER_KINDS: dict[str, OptimizerKind] = {k.name: k for k in (
    _kind("Adam", "adam", None, None, False, True,
          "DeepSpeed's Adam: AdamW unless adam_w_mode is false; weight_decay defaults to 0"),
    _kind("AdamW", "adam", True, None, False, True, "DeepSpeed's AdamW; weight_decay defaults to 0"),
    _kind("CPUAdam", "adam", None, None, False, False,
          "offload_engine.optim.CPUAdam (DeepSpeedCPUAdam's constructor): AdamW unless adamw_mode is false"),
    _kind("Adam8bit", "adam", False, "int8", False, False, "Adam with 8-bit block-quantized moments"),
    _kind("AdamW8bit", "adam", True, "int8", False, False, "AdamW with 8-bit block-quantized moments"),
    _kind("Adam4bit", "adam", False, "int4", False, False, "Adam with 4-bit block-quantized moments"),
    _kind("AdamW4bit", "adam", True, "int4", False, False, "AdamW with 4-bit block-quantized moments"),
    _kind("PagedAdam", "adam", False, "fp32", True, False, "Adam with fp32 moments in a page store"),
    _kind("PagedAdamW", "adam", True, "fp32", True, False, "AdamW with fp32 moments in a page store"),
    _kind("PagedAdam8bit", "adam", False, "int8", True, False, "Adam with 8-bit moments in a page store"),
    _kind("PagedAdamW8bit", "adam", True, "int8", True, False, "AdamW with 8-bit moments in a page store"),
    _kind("Lion", "lion", True, None, False, True,
          "DeepSpeed's Lion (lr 1e-3, betas (0.9, 0.999) by default)"),
    _kind("Lion8bit", "lion", True, "int8", False, False, "Lion with an 8-bit block-quantized momentum"),
    _kind("PagedLion", "lion", True, "fp32", True, False, "Lion with an fp32 momentum in a page store"),
    _kind("PagedLion8bit", "lion", True, "int8", True, False, "Lion with an 8-bit momentum in a page store"),
)}

# DeepSpeed (or torch.optim) optimizer names this package does not provide: a clear "not
# supported" instead of a did-you-mean towards an unrelated name.
DEEPSPEED_ONLY_OPTIMIZERS = ("OneBitAdam", "ZeroOneAdam", "OneBitLamb", "Lamb", "Adagrad", "MuAdam", "MuAdamW",
                             "MuSGD", "Muon", "SGD", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta")

# Constructor keywords of the paged classes that the engine fills in from the paging section.
ENGINE_OWNED_PARAMS = ("store", "nvme_path", "page_size_mb", "prefetch_depth", "io_threads", "executor",
                       "master_weights", "pin_memory")


def _no_amsgrad(value: bool) -> bool:
    if value:
        raise ValueError("amsgrad=true is not supported (the fused kernels keep no max_exp_avg_sq); use false")
    return value


# name -> (annotation, description). Defaults come per type (below).
_PARAM_FIELDS = {
    "lr": (NonNegativeFloat, "Learning rate: a finite number >= 0."),
    "betas": (Betas, "Moment decay rates [beta1, beta2], each in [0, 1)."),
    "eps": (NonNegativeFloat, "Added to the denominator for numerical stability: a finite number >= 0."),
    "weight_decay": (NonNegativeFloat, ("Weight decay coefficient (decoupled for the AdamW variants and Lion, L2 "
                                        "added to the gradient for Adam): a finite number >= 0.")),
    "bias_correction": (bool, ("Apply Adam's bias correction. false is honoured only by CPUAdam (fp32 state, no "
                               "page store); the other classes always correct.")),
    "amsgrad": (Annotated[bool, AfterValidator(_no_amsgrad)], "Accepted for compatibility; only false is supported."),
    "adam_w_mode": (bool, ("DeepSpeed's switch: true = AdamW (decoupled weight decay), false = Adam with L2 "
                           "regularization. With type AdamW it must be true.")),
    "adamw_mode": (bool, "CPUAdam's constructor name for adam_w_mode: true = AdamW, false = Adam (L2)."),
    "maximize": (bool, "Maximize the objective instead of minimizing it."),
    "stochastic_rounding": (bool, ("Round bf16/fp16 params stochastically when writing the update back (no "
                                   "effect on fp32 params).")),
    "block_size": (BlockSize | None, ("Quantization block of 8-bit/4-bit state: a power of two from 64 to 4096; "
                                      "null = the format's default (256 for int8, 128 for int4). Only for "
                                      "quantized or paged classes.")),
    "min_8bit_size": (NonNegativeInt, ("Params with fewer elements keep fp32 state even in a quantized optimizer. "
                                       "Only for quantized or paged classes.")),
}

_ADAM_DS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
_ADAM_CLASS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
_LION_DS = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}
_LION_CLASS = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}
_OPTIONS = {"maximize": False, "stochastic_rounding": False}
_QUANT = {"block_size": None, "min_8bit_size": 4096}


def _defaults(kind: OptimizerKind) -> dict:
    """Each accepted param of a type with its default (the type's meaning, see module doc)."""
    if kind.algorithm == "lion":
        return {**(_LION_DS if kind.deepspeed else _LION_CLASS), **_OPTIONS, **_QUANT}
    if kind.name in ("Adam", "AdamW"):
        return {**_ADAM_DS, "bias_correction": True, "amsgrad": False, "adam_w_mode": True, **_OPTIONS, **_QUANT}
    if kind.name == "CPUAdam":
        return {**_ADAM_CLASS, "weight_decay": 0.0, "bias_correction": True, "amsgrad": False, "adamw_mode": True,
                "adam_w_mode": None, **_OPTIONS, **_QUANT}
    return {**_ADAM_CLASS, "weight_decay": 1e-2 if kind.adamw else 0.0, "amsgrad": False, **_OPTIONS, **_QUANT}


def _params_model(kind: OptimizerKind) -> type[Section]:
    fields = {}
    for name, default in _defaults(kind).items():
        annotation, description = _PARAM_FIELDS[name]
        if name == "adam_w_mode" and kind.name == "CPUAdam":
            annotation, description = bool | None, ("DeepSpeed's spelling of adamw_mode (null = use adamw_mode); "
                                                    "if both are given they must agree.")
        extra = {"allowed": "null or a power of two from 64 to 4096"} if name == "block_size" else None
        fields[name] = (annotation, Field(default, description=description, json_schema_extra=extra))
    model = create_model(f"{kind.name}Params", __base__=Section, **fields)
    model.__doc__ = f"params of optimizer type {kind.name}: {kind.summary}."
    return model


def _section_model(kind: OptimizerKind, params: type[Section]) -> type[Section]:
    model = create_model(
        f"{kind.name}Section", __base__=Section,
        type=(Literal[kind.name], Field(description="Optimizer type (case-insensitive).")),
        params=(params, Field(default_factory=params, description=f"Keyword settings of {kind.name}.")),
    )
    model.__doc__ = f"optimizer section with type {kind.name}."
    return model


PARAMS_MODELS: dict[str, type[Section]] = {name: _params_model(kind) for name, kind in OPTIMIZER_KINDS.items()}
OPTIMIZER_SECTIONS: dict[str, type[Section]] = {name: _section_model(OPTIMIZER_KINDS[name], model)
                                                for name, model in PARAMS_MODELS.items()}

