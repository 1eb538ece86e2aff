"""Lion front-ends with bitsandbytes' constructors: Lion (fp32 momentum, or block-quantized with
``optim_bits=8``) and Lion8bit; the docstrings are composed in _docs.py."""
from __future__ import annotations

from . import _bnb, _docs
from ._base import BlockwiseOptimizer


class Lion(BlockwiseOptimizer):
    """bitsandbytes' Lion arguments in its order (_bnb.py), then ours as keywords."""

    _algorithm = "lion"
    _moments = ("exp_avg",)
    _format = None  # optim_bits decides

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32, args=None,
                 min_8bit_size=4096, is_paged=False, *, percentile_clipping=100, block_wise=True, block_size=None,
                 maximize=False, stochastic_rounding=False, master_weights=False):
        self._build(params, lr, betas, weight_decay, optim_bits, args, min_8bit_size, is_paged, percentile_clipping,
                    block_wise, block_size, maximize, stochastic_rounding, master_weights)

    def _build(self, params, lr, betas, weight_decay, optim_bits, args, min_8bit_size, is_paged, percentile_clipping,
               block_wise, block_size, maximize, stochastic_rounding, master_weights):
        fmt, min_8bit_size = _bnb.resolve(type(self).__name__, fixed_format=self._format, optim_bits=optim_bits,
                                          args=args, min_8bit_size=min_8bit_size,
                                          percentile_clipping=percentile_clipping, block_wise=block_wise)
        super().__init__(params, lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay, amsgrad=False,
                         adamw_mode=True, bias_correction=False, maximize=maximize,
                         stochastic_rounding=stochastic_rounding, state_format=fmt, block_size=block_size,
                         min_8bit_size=min_8bit_size, master_weights=master_weights)
        _bnb.check_is_paged(self, is_paged)


class Lion8bit(Lion):
    """bitsandbytes' Lion8bit arguments (no optim_bits), then ours as keywords."""

    _format = "int8"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None, min_8bit_size=4096,
                 is_paged=False, *, percentile_clipping=100, block_wise=True, block_size=None, maximize=False,
                 stochastic_rounding=False, master_weights=False):
        self._build(params, lr, betas, weight_decay, 32, args, min_8bit_size, is_paged, percentile_clipping,
                    block_wise, block_size, maximize, stochastic_rounding, master_weights)


_MOMENTUM = "The momentum ``m`` (``exp_avg``, Lion's only state)"
for _cls, _summary, _state, _entries in [
        (Lion, "Lion, with bitsandbytes' Lion constructor: an fp32 momentum, or 8-bit with ``optim_bits=8``.",
         _docs.state_text(moments=_MOMENTUM, plural=False, fmt="fp32") + " " + _docs.by_optim_bits(plural=False),
         {"min_8bit_size": "min_8bit_size_bits", "block_size": "block_size_bits"}),
        (Lion8bit, "Lion with an 8-bit block-quantized momentum, with bitsandbytes' Lion8bit constructor.",
         _docs.state_text(moments=_MOMENTUM, plural=False, fmt="int8"), {})]:
    _docs.document(_cls, _summary, math=_docs.lion_math(), state=_state,
                   example=f""">>> model = torch.nn.Linear(256, 256)
>>> opt = {_cls.__name__}(model.parameters(), lr=1e-4, weight_decay=1e-2)
>>> model(torch.randn(8, 256)).square().mean().backward()
>>> opt.step()
>>> opt.zero_grad()""", block=256, entries={"betas": "betas_lion", **_entries})
