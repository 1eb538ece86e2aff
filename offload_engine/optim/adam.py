"""Adam/AdamW front-ends: CPUAdam (DeepSpeedCPUAdam's constructor, fp32 moments) and the
block-quantized Adam8bit, AdamW8bit, Adam4bit, AdamW4bit (bitsandbytes' constructors).
All share one step loop and state handling (_base.BlockwiseOptimizer)."""
from __future__ import annotations

from ._base import BlockwiseOptimizer


class CPUAdam(BlockwiseOptimizer):
    """Adam (``adamw_mode=False``: L2 weight decay) or AdamW (default) for CPU params, fp32
    moments also for bf16/fp16 params (the update is computed in fp32 and rounded once).

    Args as DeepSpeedCPUAdam (amsgrad must be False). Keyword-only extras: ``maximize``;
    ``stochastic_rounding`` for bf16/fp16 params (seeded from torch's default generator at
    construction, so ``torch.manual_seed`` makes runs repeatable), or ``master_weights`` (an
    fp32 copy of each bf16/fp16 param kept with its state and updated instead of the param).
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adamw_mode=True, *, maximize=False, stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         adamw_mode=adamw_mode, bias_correction=bias_correction, maximize=maximize,
                         stochastic_rounding=stochastic_rounding, state_format="fp32", master_weights=master_weights)


class _QuantizedAdam(BlockwiseOptimizer):
    _format = "int8"
    _adamw = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 min_8bit_size=4096, *, block_size=None, maximize=False, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         adamw_mode=self._adamw, maximize=maximize, stochastic_rounding=stochastic_rounding,
                         state_format=self._format, block_size=block_size, min_8bit_size=min_8bit_size,
                         master_weights=master_weights)


class Adam8bit(_QuantizedAdam):
    """Adam (L2 weight decay) with 8-bit block-quantized moments (block 256 by default).
    Params with fewer than ``min_8bit_size`` elements keep fp32 moments."""


class AdamW8bit(_QuantizedAdam):
    """AdamW with 8-bit block-quantized moments; weight_decay defaults to 1e-2 (bitsandbytes)."""

    _adamw = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 min_8bit_size=4096, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, min_8bit_size, **kwargs)


class Adam4bit(_QuantizedAdam):
    """Adam with 4-bit block-quantized moments (block 128 by default, torchao's maps)."""

    _format = "int4"


class AdamW4bit(AdamW8bit):
    """AdamW with 4-bit block-quantized moments (block 128 by default, torchao's maps)."""

    _format = "int4"
