"""The public paged optimizers: PagedAdam, PagedAdamW (fp32 moments), PagedAdam8bit,
PagedAdamW8bit (8-bit block-quantized moments), PagedLion and PagedLion8bit.

PagedOptimizer (paged.py) is the machinery: param groups, per-param jobs, the Pager and the
state_dict translation. These classes fix the constructor (bitsandbytes' positional arguments,
then the paging keywords) and the algorithm; their docstrings are composed in _docs.py.
"""
from __future__ import annotations

from . import _bnb, _docs
from .paged import DEFAULT_PAGE_SIZE_MB, DEFAULT_PREFETCH_DEPTH, PagedOptimizer

__all__ = ["PagedAdam", "PagedAdamW", "PagedAdam8bit", "PagedAdamW8bit", "PagedLion", "PagedLion8bit"]


class _PagedAdam(PagedOptimizer):
    """The constructor of the paged Adam classes (L2 weight decay): bitsandbytes' PagedAdam
    arguments in its order (_bnb.py), then the paging keywords and ours."""

    _format = None  # optim_bits decides (the 8-bit classes fix it)
    _adamw = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False, *, percentile_clipping=100,
                 block_wise=True, block_size=None, maximize=False, store="cpu", nvme_path=None,
                 page_size_mb=DEFAULT_PAGE_SIZE_MB, prefetch_depth=DEFAULT_PREFETCH_DEPTH, io_threads=4,
                 executor="auto", gpu_fraction=None, rebalance=None, stochastic_rounding=False,
                 master_weights=False):
        # is_paged: bitsandbytes' Paged classes take it and are paged whatever its value.
        self._build(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                    percentile_clipping, block_wise, block_size, maximize, stochastic_rounding, master_weights,
                    dict(store=store, nvme_path=nvme_path, page_size_mb=page_size_mb, prefetch_depth=prefetch_depth,
                         io_threads=io_threads, executor=executor, gpu_fraction=gpu_fraction, rebalance=rebalance))

    def _build(self, params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
               percentile_clipping, block_wise, block_size, maximize, stochastic_rounding, master_weights, paging):
        fmt, min_8bit_size = _bnb.resolve(type(self).__name__, fixed_format=self._format, optim_bits=optim_bits,
                                          args=args, min_8bit_size=min_8bit_size,
                                          percentile_clipping=percentile_clipping, block_wise=block_wise)
        super().__init__(params, **paging, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         adamw_mode=self._adamw, maximize=maximize, stochastic_rounding=stochastic_rounding,
                         state_format=fmt, block_size=block_size, min_8bit_size=min_8bit_size,
                         master_weights=master_weights)


class _PagedAdamW(_PagedAdam):
    """The constructor of the paged AdamW classes: decoupled weight decay, 1e-2 by default
    (bitsandbytes' default); bitsandbytes' PagedAdamW has no is_paged."""

    _adamw = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, *, percentile_clipping=100, block_wise=True,
                 block_size=None, maximize=False, store="cpu", nvme_path=None, page_size_mb=DEFAULT_PAGE_SIZE_MB,
                 prefetch_depth=DEFAULT_PREFETCH_DEPTH, io_threads=4, executor="auto", gpu_fraction=None,
                 rebalance=None, stochastic_rounding=False, master_weights=False):
        self._build(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                    percentile_clipping, block_wise, block_size, maximize, stochastic_rounding, master_weights,
                    dict(store=store, nvme_path=nvme_path, page_size_mb=page_size_mb, prefetch_depth=prefetch_depth,
                         io_threads=io_threads, executor=executor, gpu_fraction=gpu_fraction, rebalance=rebalance))


class PagedAdam(_PagedAdam):
    pass


class PagedAdamW(_PagedAdamW):
    pass


class PagedAdam8bit(_PagedAdam):
    _format = "int8"


class PagedAdamW8bit(_PagedAdamW):
    _format = "int8"


class PagedLion(PagedOptimizer):
    """bitsandbytes' PagedLion arguments in its order (optim_bits 8 gives 8-bit state; no
    is_paged), then the paging keywords and ours."""

    _algorithm = "lion"
    _moments = ("exp_avg",)
    _format = None  # optim_bits decides

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, optim_bits=32, args=None,
                 min_8bit_size=4096, *, percentile_clipping=100, block_wise=True, block_size=None, maximize=False,
                 store="cpu", nvme_path=None, page_size_mb=DEFAULT_PAGE_SIZE_MB, prefetch_depth=DEFAULT_PREFETCH_DEPTH,
                 io_threads=4, executor="auto", gpu_fraction=None, rebalance=None, stochastic_rounding=False,
                 master_weights=False):
        self._build(params, lr, betas, weight_decay, optim_bits, args, min_8bit_size, percentile_clipping,
                    block_wise, block_size, maximize, stochastic_rounding, master_weights,
                    dict(store=store, nvme_path=nvme_path, page_size_mb=page_size_mb, prefetch_depth=prefetch_depth,
                         io_threads=io_threads, executor=executor, gpu_fraction=gpu_fraction, rebalance=rebalance))

    def _build(self, params, lr, betas, weight_decay, optim_bits, args, min_8bit_size, percentile_clipping,
               block_wise, block_size, maximize, stochastic_rounding, master_weights, paging):
        fmt, min_8bit_size = _bnb.resolve(type(self).__name__, fixed_format=self._format, optim_bits=optim_bits,
                                          args=args, min_8bit_size=min_8bit_size,
                                          percentile_clipping=percentile_clipping, block_wise=block_wise)
        super().__init__(params, **paging, lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay, amsgrad=False,
                         adamw_mode=True, bias_correction=False, maximize=maximize,
                         stochastic_rounding=stochastic_rounding, state_format=fmt,
                         block_size=block_size, min_8bit_size=min_8bit_size, master_weights=master_weights)


class PagedLion8bit(PagedLion):
    """bitsandbytes' PagedLion8bit arguments (no optim_bits, no is_paged), then ours."""

    _format = "int8"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, args=None, min_8bit_size=4096, *,
                 percentile_clipping=100, block_wise=True, block_size=None, maximize=False, store="cpu",
                 nvme_path=None, page_size_mb=DEFAULT_PAGE_SIZE_MB, prefetch_depth=DEFAULT_PREFETCH_DEPTH,
                 io_threads=4, executor="auto", gpu_fraction=None, rebalance=None, stochastic_rounding=False,
                 master_weights=False):
        self._build(params, lr, betas, weight_decay, 32, args, min_8bit_size, percentile_clipping, block_wise,
                    block_size, maximize, stochastic_rounding, master_weights,
                    dict(store=store, nvme_path=nvme_path, page_size_mb=page_size_mb, prefetch_depth=prefetch_depth,
                         io_threads=io_threads, executor=executor, gpu_fraction=gpu_fraction, rebalance=rebalance))


def _example(name: str, make: str) -> str:
    return f""">>> model = torch.nn.Linear(256, 256)
>>> opt = {name}(model.parameters(), {make})
>>> model(torch.randn(8, 256)).square().mean().backward()
>>> opt.step()
>>> opt.zero_grad()
>>> opt.paging_stats()["store"]
'cpu'
>>> opt.close()
>>> # the state in a file on a local NVMe drive:
>>> opt = {name}(model.parameters(), store="nvme", nvme_path="/local_nvme")  # doctest: +SKIP"""


_BY_BITS = {"min_8bit_size": "min_8bit_size_bits", "block_size": "block_size_bits"}
_ADAM_MOMENTS = "The moments ``m`` (``exp_avg``) and ``v`` (``exp_avg_sq``)"
_LION_MOMENTUM = "The momentum ``m`` (``exp_avg``, Lion's only state)"
_TWIN8 = {PagedAdam: "Adam8bit", PagedAdamW: "AdamW8bit", PagedLion: "Lion8bit"}
for _cls, _summary, _l2, _fmt, _twin, _make in [
        (PagedAdam, "Adam (L2 weight decay) with its moments kept in a page store: bitsandbytes' PagedAdam, fp32 "
         "moments or 8-bit with ``optim_bits=8``.", True, None, "CPUAdam(..., adamw_mode=False)",
         "lr=1e-3, weight_decay=1e-4, page_size_mb=1"),
        (PagedAdamW, "AdamW (decoupled weight decay) with its moments kept in a page store: bitsandbytes' "
         "PagedAdamW, fp32 moments or 8-bit with ``optim_bits=8``.", False, None, "CPUAdam", "lr=1e-3, page_size_mb=1"),
        (PagedAdam8bit, "Adam (L2 weight decay) with 8-bit block-quantized moments kept in a page store.", True,
         "int8", "Adam8bit", "lr=1e-3, page_size_mb=1"),
        (PagedAdamW8bit, "AdamW with 8-bit block-quantized moments kept in a page store: bitsandbytes' "
         "PagedAdamW8bit, with the pages in host RAM or on NVMe.", False, "int8", "AdamW8bit",
         "lr=1e-3, page_size_mb=1, prefetch_depth=2")]:
    _state = (_docs.state_text(moments=_ADAM_MOMENTS, plural=True, fmt=_fmt) if _fmt else
              _docs.state_text(moments=_ADAM_MOMENTS, plural=True, fmt="fp32") + " " + _docs.by_optim_bits(plural=True))
    _docs.document(_cls, _summary, math=_docs.adam_math(l2=_l2), state=_state,
                   example=_example(_cls.__name__, _make), paged_twin=_twin, paged_twin8=_TWIN8.get(_cls), block=256,
                   entries={"is_paged": "is_paged_paged", **({"weight_decay": "weight_decay_l2"} if _l2 else {}),
                            **({"optim_bits": "optim_bits_fixed"} if _fmt else _BY_BITS)})
for _cls, _summary, _fmt, _twin in [
        (PagedLion, "Lion with its momentum kept in a page store: bitsandbytes' PagedLion, an fp32 momentum or "
         "8-bit with ``optim_bits=8``.", None, "Lion"),
        (PagedLion8bit, "Lion with an 8-bit block-quantized momentum kept in a page store.", "int8", "Lion8bit")]:
    _state = (_docs.state_text(moments=_LION_MOMENTUM, plural=False, fmt=_fmt) if _fmt else
              _docs.state_text(moments=_LION_MOMENTUM, plural=False, fmt="fp32") + " " + _docs.by_optim_bits(plural=False))
    _docs.document(_cls, _summary, math=_docs.lion_math(), state=_state,
                   example=_example(_cls.__name__, "lr=1e-4, weight_decay=1e-2, page_size_mb=1"), paged_twin=_twin,
                   paged_twin8=_TWIN8.get(_cls), block=256, entries={"betas": "betas_lion", **({} if _fmt else _BY_BITS)})
