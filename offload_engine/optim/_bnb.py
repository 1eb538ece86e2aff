"""bitsandbytes' constructor arguments that name no setting of ours directly: ``optim_bits``,
``args``, ``is_paged`` and the older keywords ``percentile_clipping`` and ``block_wise``. Each
takes its bitsandbytes meaning where we implement it, and is refused, naming the argument and
what is allowed, where we do not (bitsandbytes 0.50's signatures, class by class:
tests/test_bnb_signatures.py).

  optim_bits   the classes without a bit width in the name (Lion, PagedAdam, PagedAdamW,
               PagedLion): 32 keeps fp32 state, 8 block-quantized 8-bit state, as in
               bitsandbytes (4, our 4-bit format, also). The 8-bit and 4-bit classes take only
               32, bitsandbytes' compatibility default, and refuse any other value as it does.
  args         bitsandbytes' override object (an argparse namespace, say): as there, its
               optim_bits and min_8bit_size replace the arguments, in every class (an Adam8bit
               given args.optim_bits=32 keeps fp32 state, as bitsandbytes' does); its
               max_unorm, skip_zeros and (older releases) percentile_clipping and block_wise
               must be their no-op values. A missing attribute keeps the argument's value.
  is_paged     the unpaged classes: bitsandbytes pages the state of CUDA params out of GPU
               memory (CUDA managed memory) under pressure. With CPU params the state already
               lives in host memory, so True changes nothing; with CUDA params it is refused,
               naming the Paged class that does it. PagedAdam and PagedAdam8bit take it and are
               paged whatever its value, as bitsandbytes' are.
"""
from __future__ import annotations

import torch

# bitsandbytes' meaning of each setting's default is "off"; any other value asks for a feature
# we do not implement, so it is refused rather than silently dropped.
_NO_OP = {"percentile_clipping": 100, "block_wise": True, "max_unorm": 0.0, "skip_zeros": False}
_WHY = {"percentile_clipping": "clipping by a percentile of recent gradient norms is not implemented; clip with "
                               "the engine's gradient_clipping or torch.nn.utils.clip_grad_norm_",
        "block_wise": "the state is always block-quantized, one absmax per block",
        "max_unorm": "capping the update's norm is not implemented",
        "skip_zeros": "every element is updated, zero gradients included"}
_FORMAT_OF_BITS = {32: "fp32", 8: "int8", 4: "int4"}


def resolve(cls_name: str, *, fixed_format: str | None, optim_bits, args, min_8bit_size,
            percentile_clipping=100, block_wise=True) -> tuple[str, int]:
    """(the state format, min_8bit_size) for bitsandbytes' arguments (module docstring);
    raises ValueError naming the argument we cannot honour."""
    settings = {"percentile_clipping": percentile_clipping, "block_wise": block_wise}
    for key, value in settings.items():
        if value != _NO_OP[key]:
            raise ValueError(f"{cls_name}: {key}={value!r} is not supported, only {_NO_OP[key]!r} ({_WHY[key]})")
    if fixed_format is not None and optim_bits != 32:
        raise ValueError(f"{cls_name}: optim_bits={optim_bits!r}: this class keeps {fixed_format} state and takes "
                         "only optim_bits=32 (kept for bitsandbytes' signature); for another width pick its class")
    fmt = fixed_format or _FORMAT_OF_BITS.get(optim_bits)
    where = ""
    if args is not None:
        where = "args."
        for key, no_op in _NO_OP.items():
            value = getattr(args, key, no_op)
            if value != no_op:
                raise ValueError(f"{cls_name}: args.{key}={value!r} is not supported, only {no_op!r} ({_WHY[key]})")
        min_8bit_size = getattr(args, "min_8bit_size", min_8bit_size)
        if hasattr(args, "optim_bits"):
            optim_bits = args.optim_bits
            fmt = _FORMAT_OF_BITS.get(optim_bits)
    if fmt is None:
        raise ValueError(f"{cls_name}: {where}optim_bits={optim_bits!r} is not a state width we keep: 32 (fp32), "
                         "8 (8-bit block-quantized) or 4 (4-bit block-quantized)")
    return fmt, min_8bit_size


def check_is_paged(optimizer: torch.optim.Optimizer, is_paged) -> None:
    """is_paged on an unpaged class (module docstring)."""
    name = type(optimizer).__name__
    if not isinstance(is_paged, bool):
        raise ValueError(f"{name}: is_paged must be True or False; got is_paged={is_paged!r}")
    if is_paged and any(p.device.type == "cuda" for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"{name}: is_paged=True with CUDA params asks for state paged out of GPU memory: use "
                         f"Paged{name} (the state in host RAM or on NVMe, moved a page at a time; store=\"managed\" "
                         "for CUDA managed memory), or is_paged=False to keep the state on the GPU")
