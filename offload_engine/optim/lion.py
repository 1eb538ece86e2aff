"""Lion front-ends (bitsandbytes' constructors): fp32 momentum (Lion) or block-quantized
(Lion8bit). Update: p -= lr * sign(beta1 * m + (1 - beta1) * g), then
m = beta2 * m + (1 - beta2) * g, with decoupled weight decay."""
from __future__ import annotations

from ._base import BlockwiseOptimizer


class Lion(BlockwiseOptimizer):
    """Lion with an fp32 momentum."""

    _algorithm = "lion"
    _moments = ("exp_avg",)
    _format = "fp32"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, min_8bit_size=4096, *,
                 block_size=None, maximize=False, stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay, amsgrad=False,
                         adamw_mode=True, bias_correction=False, maximize=maximize,
                         stochastic_rounding=stochastic_rounding, state_format=self._format, block_size=block_size,
                         min_8bit_size=min_8bit_size, master_weights=master_weights)


class Lion8bit(Lion):
    """Lion with an 8-bit block-quantized momentum (block 256 by default); params with fewer
    than ``min_8bit_size`` elements keep an fp32 momentum."""

    _format = "int8"
