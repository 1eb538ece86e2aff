"""The base of every config section and the constrained value types the sections share.

Sections are strict: a bool must be a JSON ``true``/``false`` (not ``"yes"`` or ``1``), an int
must be a JSON integer (not ``2.0``), a number may be an integer or a float but never a string,
and no number may be NaN or infinite. Unknown keys are rejected (``extra="forbid"``).
Sections are frozen: a loaded config is a value, not a place to keep run-time state.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

__all__ = [
    "BLOCK_SIZES",
    "Betas",
    "BlockSize",
    "NonEmptyStr",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "Section",
]


class Section(BaseModel):
    """A strict, frozen config section that rejects unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True,
                              validate_default=False)


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]

# JSON has no tuples: the pair may be written as a list (Strict(False) on the outer tuple only;
# each element stays a strict number).
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Betas = Annotated[tuple[Beta, Beta], Strict(False)]

# The quantization block sizes the codec supports (offload_engine/quant/codec.py BLOCK_SIZES;
# tests/test_config.py checks the two agree, so the config module need not import torch).
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def _check_block(value: int) -> int:
    if value not in BLOCK_SIZES:
        raise ValueError(f"must be a power of two from 64 to 4096 (one of {', '.join(map(str, BLOCK_SIZES))}), "
                         f"got {value}")
    return value


BlockSize = Annotated[int, AfterValidator(_check_block)]
