"""Adam/AdamW front-ends: CPUAdam (DeepSpeedCPUAdam's constructor, fp32 moments) and the
block-quantized Adam8bit, AdamW8bit, Adam4bit, AdamW4bit (bitsandbytes' constructors).
All share one step loop and state handling (_base.BlockwiseOptimizer); the docstrings are
composed in _docs.py."""
from __future__ import annotations

from . import _docs
from ._base import BlockwiseOptimizer


class CPUAdam(BlockwiseOptimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adamw_mode=True, *, maximize=False, stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         adamw_mode=adamw_mode, bias_correction=bias_correction, maximize=maximize,
                         stochastic_rounding=stochastic_rounding, state_format="fp32", master_weights=master_weights)


class _QuantizedAdam(BlockwiseOptimizer):
    """The constructor of the quantized Adam classes (L2 weight decay)."""

    _format = "int8"
    _adamw = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 min_8bit_size=4096, *, block_size=None, maximize=False, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         adamw_mode=self._adamw, maximize=maximize, stochastic_rounding=stochastic_rounding,
                         state_format=self._format, block_size=block_size, min_8bit_size=min_8bit_size,
                         master_weights=master_weights)


class _QuantizedAdamW(_QuantizedAdam):
    """The constructor of the quantized AdamW classes: decoupled weight decay, 1e-2 by default
    (bitsandbytes' default)."""

    _adamw = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 min_8bit_size=4096, *, block_size=None, maximize=False, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, min_8bit_size, block_size=block_size,
                         maximize=maximize, stochastic_rounding=stochastic_rounding, master_weights=master_weights)


class Adam8bit(_QuantizedAdam):
    pass


class AdamW8bit(_QuantizedAdamW):
    pass


class Adam4bit(_QuantizedAdam):
    _format = "int4"


class AdamW4bit(_QuantizedAdamW):
    _format = "int4"


def _example(name: str, make: str) -> str:
    return f""">>> model = torch.nn.Linear(256, 256)
>>> opt = {name}(model.parameters(), {make})
>>> model(torch.randn(8, 256)).square().mean().backward()
>>> opt.step()
>>> opt.zero_grad()"""


_MOMENTS = "The moments ``m`` (``exp_avg``) and ``v`` (``exp_avg_sq``)"
_docs.document(
    CPUAdam, "Adam or AdamW (``adamw_mode``, AdamW by default) with fp32 moments, with DeepSpeedCPUAdam's "
    "constructor; the update is computed in fp32 also for bf16/fp16 params.",
    math=_docs.adam_math(l2=None, bias_correction_arg=True),
    state=_docs.state_text(moments=_MOMENTS, plural=True, fmt="fp32"),
    example=_example("CPUAdam", "lr=1e-3, weight_decay=1e-2"), entries={"weight_decay": "weight_decay_mode"})
for _cls, _summary, _l2, _fmt, _block, _make in [
        (Adam8bit, "Adam (L2 weight decay) with 8-bit block-quantized moments, with bitsandbytes' Adam8bit "
         "constructor.", True, "int8", 256, "lr=1e-3, min_8bit_size=0"),
        (AdamW8bit, "AdamW with 8-bit block-quantized moments, with bitsandbytes' AdamW8bit constructor.",
         False, "int8", 256, "lr=1e-3, min_8bit_size=0"),
        (Adam4bit, "Adam (L2 weight decay) with 4-bit block-quantized moments.", True, "int4", 128,
         "lr=1e-3, min_8bit_size=0"),
        (AdamW4bit, "AdamW with 4-bit block-quantized moments (torchao's AdamW4bit format).", False, "int4", 128,
         "lr=1e-3, min_8bit_size=0, block_size=128")]:
    _docs.document(_cls, _summary, math=_docs.adam_math(l2=_l2),
                   state=_docs.state_text(moments=_MOMENTS, plural=True, fmt=_fmt),
                   example=_example(_cls.__name__, _make), block=_block,
                   entries={"weight_decay": "weight_decay_l2"} if _l2 else None)
