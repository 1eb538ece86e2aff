"""What the planner plans for: the trainable params of a model, as shapes on the meta device
(no memory, no values), and the ranks that share them.

A model is a built-in size of offload-train ("small", "base", ...), a local Hugging Face model
directory or config.json (transformers builds it on the meta device), or a parameter count
(``params=1.3e9``), laid out as matrices of at most CHUNK_NUMEL elements so its pages fill as a
real model's do. Every param is in the dtype the engine trains it in (``dtype``: fp32, or bf16
and fp16 with fp32 master weights paged beside the state).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

CHUNK_NUMEL = 1 << 24  # a parameter count is laid out as params of this many elements (a 4096 x 4096 matrix)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PlanError(ValueError):
    """An input the planner cannot plan for; the message names the argument and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Workload:
    description: str
    shapes: tuple             # trainable params' shapes, in the model's parameter order
    dtype: str                # "fp32" | "bf16" | "fp16": what the params are trained in
    ranks_per_node: int = 1
    nodes: int = 1
    micro_batch: int | None = None
    seq_len: int | None = None

    @property
    def world(self) -> int:
        return self.ranks_per_node * self.nodes

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def meta_params(self) -> list[torch.nn.Parameter]:
        """The params on the meta device, in the training dtype."""
        dtype = DTYPES[self.dtype]
        return [torch.nn.Parameter(torch.empty(s, dtype=dtype, device="meta")) for s in self.shapes]


def from_module(module: torch.nn.Module, description: str, dtype: str = "fp32", **world) -> Workload:
    """The Workload of `module`'s trainable params (on any device, meta included)."""
    if dtype not in DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    shapes = tuple(tuple(p.shape) for p in module.parameters() if p.requires_grad)
    return Workload(description, shapes, dtype, **world)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def workload(model: str | None = None, params: float | None = None, dtype: str = "fp32", *, ranks_per_node: int = 1,
             nodes: int = 1, micro_batch: int | None = None, seq_len: int | None = None) -> Workload:
    """The Workload of `model` (a built-in size or a Hugging Face directory/config.json) or of
    `params` (a parameter count); exactly one of them. Raises PlanError naming the argument."""
    if dtype not in DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    for name, value in (("ranks_per_node", ranks_per_node), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be an integer >= 1; got {value!r}")
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PlanError(f"{name} must be an integer >= 1 when given; got {value!r}")
    if (model is None) == (params is None):
        raise PlanError("give a model (--model: a built-in size, a Hugging Face directory or config.json) or a "
                        "parameter count (--params), not both and not neither")
    if params is not None:
        if isinstance(params, bool) or not isinstance(params, (int, float)) or not params >= 1 or params > 1e13:
            raise PlanError(f"params must be a parameter count between 1 and 1e13; got {params!r}")
        total = int(params)
        shapes = [(CHUNK_NUMEL,)] * (total // CHUNK_NUMEL) + ([(total % CHUNK_NUMEL,)] if total % CHUNK_NUMEL else [])
        description = f"{_count(total)} params"
    else:
        shapes, description = _model_shapes(model, seq_len)
    return Workload(description, tuple(tuple(s) for s in shapes), dtype, ranks_per_node, nodes, micro_batch, seq_len)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _model_shapes(model: str, seq_len: int | None) -> tuple[list, str]:
    from ..train.models import SIZES, GPT
    if model in SIZES:
        size = SIZES[model]
        if seq_len is not None:
            size = dataclasses.replace(size, context=max(size.context, seq_len))
        with torch.device("meta"):
            module = GPT(size)
        return [tuple(p.shape) for p in module.parameters() if p.requires_grad], \
            f"built-in {model} GPT ({size.describe()})"
    path = Path(os.fspath(model))
    if not path.exists():
        raise PlanError(f"unknown model {model!r}: built-in sizes are {', '.join(SIZES)}; or give a local Hugging Face "
                        "model directory or a transformers config.json, or a parameter count (--params)")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise PlanError(f"model {model!r}: no config.json there (a Hugging Face model directory or a transformers "
                        "config.json is expected)")
    try:
        import transformers
    except ImportError:
        raise PlanError(f"model {model!r} is a path, and reading a Hugging Face config needs transformers: "
                        "pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path if path.is_dir() else config_file))
        with torch.device("meta"):  # shapes only: a 70B model costs nothing to plan
            module = transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PlanError(f"model {model!r}: transformers cannot build a causal LM from it ({first})") from None
    return [tuple(p.shape) for p in module.parameters() if p.requires_grad], \
        f"{type(module).__name__} from {path}"
