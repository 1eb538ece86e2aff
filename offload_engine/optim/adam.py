"""Adam/AdamW front-ends: CPUAdam (DeepSpeedCPUAdam's constructor, fp32 moments) and the
block-quantized Adam8bit, AdamW8bit, Adam4bit, AdamW4bit (bitsandbytes' constructors).
All share one step loop and state handling (_base.BlockwiseOptimizer); the docstrings are
composed in _docs.py."""
from __future__ import annotations

import torch

from . import _bnb, _docs
from ._base import BlockwiseOptimizer


class CPUAdam(BlockwiseOptimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adamw_mode=True, fp32_optimizer_states=True, *, maximize=False,
                 stochastic_rounding=False, master_weights=False):
        if not isinstance(fp32_optimizer_states, bool):
            raise ValueError(f"CPUAdam: fp32_optimizer_states must be True or False; got {fp32_optimizer_states!r}")
        # Read by add_param_group, which torch's constructor calls for the first groups.
        self.fp32_optimizer_states = fp32_optimizer_states
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         adamw_mode=adamw_mode, bias_correction=bias_correction, maximize=maximize,
                         stochastic_rounding=stochastic_rounding, state_format="fp32", master_weights=master_weights)

    def add_param_group(self, param_group):
        """DeepSpeedCPUAdam's fp32_optimizer_states=False keeps a half param's moments in its dtype;
        ours are fp32 always, which means the same only for fp32 params."""
        if not self.fp32_optimizer_states:
            params = param_group["params"]
            half = [p for p in ([params] if isinstance(params, torch.Tensor) else list(params))
                    if isinstance(p, torch.Tensor) and p.dtype != torch.float32]
            if half:
                raise ValueError(f"CPUAdam: fp32_optimizer_states=False asks for moments in the param's dtype "
                                 f"({half[0].dtype} for a param of shape {list(half[0].shape)}); the moments are "
                                 "always fp32 here: leave fp32_optimizer_states=True, or for smaller state use "
                                 "AdamW8bit (8-bit block-quantized moments)")
            param_group = {**param_group, "params": params if isinstance(params, torch.Tensor) else list(params)}
        super().add_param_group(param_group)

    def __getstate__(self):
        """A deepcopy or pickled copy keeps fp32_optimizer_states (its add_param_group reads it)."""
        return {**super().__getstate__(), "fp32_optimizer_states": self.fp32_optimizer_states}


class _QuantizedAdam(BlockwiseOptimizer):
    """The constructor of the quantized Adam classes (L2 weight decay): bitsandbytes' Adam8bit
    arguments in its order (_bnb.py), then ours as keywords."""

    _format = "int8"
    _adamw = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False, *, percentile_clipping=100,
                 block_wise=True, block_size=None, maximize=False, stochastic_rounding=False,
                 master_weights=False):
        fmt, min_8bit_size = _bnb.resolve(type(self).__name__, fixed_format=self._format, optim_bits=optim_bits,
                                          args=args, min_8bit_size=min_8bit_size,
                                          percentile_clipping=percentile_clipping, block_wise=block_wise)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         adamw_mode=self._adamw, maximize=maximize, stochastic_rounding=stochastic_rounding,
                         state_format=fmt, block_size=block_size, min_8bit_size=min_8bit_size,
                         master_weights=master_weights)
        _bnb.check_is_paged(self, is_paged)


class _QuantizedAdamW(_QuantizedAdam):
    """The constructor of the quantized AdamW classes: decoupled weight decay, 1e-2 by default
    (bitsandbytes' default)."""

    _adamw = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False, *, percentile_clipping=100,
                 block_wise=True, block_size=None, maximize=False, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged,
                         percentile_clipping=percentile_clipping, block_wise=block_wise, block_size=block_size,
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
                   entries={"optim_bits": "optim_bits_fixed", **({"weight_decay": "weight_decay_l2"} if _l2 else {})})
