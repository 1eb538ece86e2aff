"""Lion front-ends (bitsandbytes' constructors): fp32 momentum (Lion) or block-quantized
(Lion8bit); the docstrings are composed in _docs.py."""
from __future__ import annotations

from . import _docs
from ._base import BlockwiseOptimizer


class Lion(BlockwiseOptimizer):
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
    _format = "int8"


_MOMENTUM = "The momentum ``m`` (``exp_avg``, Lion's only state)"
for _cls, _summary, _fmt in [(Lion, "Lion with an fp32 momentum, with bitsandbytes' Lion constructor.", "fp32"),
                             (Lion8bit, "Lion with an 8-bit block-quantized momentum, with bitsandbytes' Lion8bit "
                              "constructor.", "int8")]:
    _docs.document(_cls, _summary, math=_docs.lion_math(),
                   state=_docs.state_text(moments=_MOMENTUM, plural=False, fmt=_fmt),
                   example=f""">>> model = torch.nn.Linear(256, 256)
>>> opt = {_cls.__name__}(model.parameters(), lr=1e-4, weight_decay=1e-2)
>>> model(torch.randn(8, 256)).square().mean().backward()
>>> opt.step()
>>> opt.zero_grad()""", block=256,
                   entries={"betas": "betas_lion", **({"min_8bit_size": "min_8bit_size_unused",
                                                       "block_size": "block_size_unused"} if _fmt == "fp32" else {})})
