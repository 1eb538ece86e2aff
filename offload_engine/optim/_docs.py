"""The public optimizers' docstrings, composed from one set of pieces.

Every optimizer of the package documents its update (the math, as the kernels compute it), its
state, and an Args block with every constructor argument and its default, in torch.optim's
layout. Twelve classes share most of those words, so each piece is written once here and
``compose`` joins them; tests/test_optimizer_docs.py checks each Args block against the
constructor's signature (names, order and defaults) and runs each example.
"""
from __future__ import annotations

import inspect
import textwrap

_ADAM_MATH = """\
For each param ``p`` with gradient ``g`` at step ``t`` (1, 2, ...), computed in fp32::

    g = grad_scale * g                   step(grad_scale=...), default 1
    g = -g                               if maximize
{decay}
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr * m_hat / (sqrt(v_hat) + eps)

with ``m_hat = m / (1 - beta1**t)`` and ``v_hat = v / (1 - beta2**t)``{no_bias}."""

_L2 = "    g = g + weight_decay * p             L2 weight decay: it enters the moments"
_DECOUPLED = "    p = p * (1 - lr * weight_decay)      decoupled weight decay: not in the moments"

_LION_MATH = """\
For each param ``p`` with gradient ``g``, computed in fp32 (no bias correction, no eps)::

    g = grad_scale * g                   step(grad_scale=...), default 1
    g = -g                               if maximize
    p = p * (1 - lr * weight_decay)      decoupled weight decay
    c = beta1 * m + (1 - beta1) * g      the update direction
    p = p - lr * sign(c)                 sign(0) = 0
    m = beta2 * m + (1 - beta2) * g"""

_ROUNDING = ("A bf16/fp16 param is read as fp32 and its new value rounded once into it: to nearest even, "
             "stochastically (``stochastic_rounding``), or from an fp32 master (``master_weights``).")

_STATE_FP32 = "{moments} {are} fp32 ({bytes} bytes per element)."
_STATE_QUANT = (
    "{moments} {are} stored {bits}-bit block-quantized: each block of ``block_size`` elements keeps one "
    "fp32 absmax and one {bits}-bit code per element, the nearest entry of {maps} to ``x / absmax``. A "
    "step decodes a block, updates it in fp32 and re-encodes it. Params with fewer than ``min_8bit_size`` "
    "elements keep fp32 state.")
_MAPS = {8: "the dynamic code map of bitsandbytes' 8-bit optimizers",
         4: "a 4-bit code map (torchao's: dynamic for ``m``, linear for ``v``)"}

_IN_MEMORY = ("The state lives in ``self.state``, per param on the param's device, as torch.optim's state does, "
              "and is updated by the kernels of that device: the SIMD CPU kernels (AVX-512, AVX2 or "
              "scalar, chosen at load) or the CUDA kernels.")
_PAGED = (
    "The state lives in a page store instead of ``self.state``: host RAM (``store=\"cpu\"``), a file on "
    "NVMe (``\"nvme\"``) or CUDA managed memory (``\"managed\"``). A step moves it a page "
    "(``page_size_mb``) at a time through a bounded pool of slots to the update kernels and back, "
    "``prefetch_depth`` pages ahead: the SIMD CPU kernels for CPU params, the CUDA kernels for CUDA params "
    "(``executor``). A param gets its pages at its first gradient (or when a loaded state has state for "
    "it), so frozen params cost nothing. ``paging_stats()`` reports the traffic and the footprint per "
    "tier; ``close()`` releases the store (for NVMe it deletes the file). A step that fails half-way (an "
    "IO error) raises naming the page and the file, and the optimizer then refuses to step until "
    "``load_state_dict()`` restores a checkpoint.")
_SAME_AS = ("Results are bit for bit those of ``{twin}``{twin8} with the same arguments, whatever the store, page "
            "size, prefetch depth or executor, and ``state_dict()`` is in its format, so checkpoints move "
            "between the two both ways.")

# Args entries: each a (name, text) with "{default}" where the default goes.
_ARG = {
    "params": "params (iterable): the params to optimize (float32, bfloat16 or float16 tensors, all on "
              "the CPU or all on one CUDA device), or dicts defining param groups",
    "lr": "lr (float or Tensor, optional): learning rate, finite and >= 0; a one-element tensor is read "
          "at each step (default: {default})",
    "bias_correction": "bias_correction (bool, optional): divide the moments by ``1 - beta**t``; False "
                       "uses ``m`` and ``v`` as they are (default: {default})",
    "betas": "betas (Tuple[float, float], optional): decay rates of the running averages of the gradient "
             "and of its square, each in [0, 1) (default: {default})",
    "betas_lion": "betas (Tuple[float, float], optional): ``beta1`` mixes momentum and gradient into the "
                  "update direction, ``beta2`` is the momentum's decay rate; each in [0, 1) "
                  "(default: {default})",
    "eps": "eps (float, optional): added to the denominator for numerical stability, >= 0 "
           "(default: {default})",
    "weight_decay_l2": "weight_decay (float, optional): L2 penalty, >= 0, added to the gradient "
                       "(default: {default})",
    "weight_decay": "weight_decay (float, optional): decoupled weight decay, >= 0: each step multiplies "
                    "the param by ``1 - lr * weight_decay`` (default: {default})",
    "weight_decay_mode": "weight_decay (float, optional): >= 0; decoupled with ``adamw_mode=True``, an "
                         "L2 penalty added to the gradient otherwise (default: {default})",
    "amsgrad": "amsgrad (bool, optional): must be False (the fused kernels keep no ``max_exp_avg_sq``); "
               "True raises ValueError. Kept for the signature users come with (default: {default})",
    "adamw_mode": "adamw_mode (bool, optional): True for AdamW's decoupled weight decay, False for "
                  "Adam's L2 penalty (default: {default})",
    "min_8bit_size": "min_8bit_size (int, optional): params with fewer elements keep fp32 state, an int "
                     ">= 0 (0: quantize all). Counted on the whole param, not a rank's shard of it, so "
                     "every rank decides alike (default: {default})",
    "min_8bit_size_unused": "min_8bit_size (int, optional): kept for bitsandbytes' signature and "
                            "validated (an int >= 0); this class's state is fp32 at any size "
                            "(default: {default})",
    "min_8bit_size_bits": "min_8bit_size (int, optional): with ``optim_bits`` 8 or 4, params with fewer "
                          "elements keep fp32 state, an int >= 0 (0: quantize all); validated and unused at "
                          "32. Counted on the whole param, not a rank's shard of it (default: {default})",
    "block_size_bits": "block_size (int, optional): with ``optim_bits`` 8 or 4, elements per quantization "
                       "block, a power of two from 64 to 4096; None picks the format's (256 for 8-bit, 128 for "
                       "4-bit); validated and unused at 32 (default: {default})",
    "optim_bits": "optim_bits (int, optional): the state's width, as in bitsandbytes: 32 keeps fp32 state, 8 "
                  "8-bit block-quantized state, 4 4-bit; another value raises ValueError (default: {default})",
    "optim_bits_fixed": "optim_bits (int, optional): kept for bitsandbytes' signature, where this class "
                        "takes only its default; the width is in the class's name, and another value raises "
                        "ValueError (default: {default})",
    "args": "args (object, optional): bitsandbytes' override object (an argparse namespace, say): where it "
            "has them, its ``optim_bits`` and ``min_8bit_size`` replace those arguments, as in bitsandbytes; "
            "its ``max_unorm``, ``skip_zeros``, ``percentile_clipping`` and ``block_wise`` must be their "
            "no-op values (0.0, False, 100, True), another raises ValueError naming it (default: {default})",
    "is_paged": "is_paged (bool, optional): bitsandbytes' paged state, paged out of GPU memory under "
                "pressure. With CPU params the state already lives in host memory and True changes nothing; "
                "with CUDA params True raises ValueError naming the Paged class that pages it "
                "(default: {default})",
    "is_paged_paged": "is_paged (bool, optional): kept for bitsandbytes' signature: this class is paged "
                      "whatever its value (default: {default})",
    "percentile_clipping": "percentile_clipping (int, optional): older bitsandbytes releases' keyword; only "
                           "100 (off) is allowed, another value raises ValueError (clip with the engine's "
                           "``gradient_clipping`` or ``torch.nn.utils.clip_grad_norm_``) (default: {default})",
    "block_wise": "block_wise (bool, optional): older bitsandbytes releases' keyword; only True is allowed, "
                  "the state being always block-quantized (default: {default})",
    "fp32_optimizer_states": "fp32_optimizer_states (bool, optional): DeepSpeedCPUAdam's choice of fp32 "
                             "moments (True) or moments in the param's dtype (False). The moments are always "
                             "fp32 here: False is taken for fp32 params, where both mean the same, and raises "
                             "ValueError for a bf16/fp16 param (default: {default})",
    "block_size": "block_size (int, optional): elements per quantization block, a power of two from 64 "
                  "to 4096; None picks the format's {block} (default: {default})",
    "block_size_unused": "block_size (int, optional): kept for the quantized classes' signature and "
                         "validated (None or a power of two from 64 to 4096); unused, the state being "
                         "fp32 (default: {default})",
    "maximize": "maximize (bool, optional): maximize the objective instead of minimizing it (the "
                "gradient is negated) (default: {default})",
    "store": "store (str, optional): where the state lives: ``\"cpu\"`` (host RAM; pinned when the CUDA "
             "executor copies from it), ``\"nvme\"`` (one file under ``nvme_path``, two places per page so "
             "that a step's pages become current together) or ``\"managed\"`` (CUDA managed memory, "
             "migrated by the driver; CUDA params and the CUDA executor only) (default: {default})",
    "nvme_path": "nvme_path (str or os.PathLike, optional): a writable directory for the state file; "
                 "needed with ``store=\"nvme\"``, refused with any other store (default: {default})",
    "page_size_mb": "page_size_mb (int or float, optional): the page size in MiB, > 0 (fractions "
                    "allowed), rounded up to whole 4 KiB blocks (default: {default})",
    "prefetch_depth": "prefetch_depth (int, optional): pages fetched ahead of the one being updated, an "
                      "int >= 1; the slots it costs per tier follow the slot rule (docs/paging.md) and "
                      "``paging_stats()[\"footprint\"]`` reports them (default: {default})",
    "io_threads": "io_threads (int, optional): threads issuing the NVMe store's reads and writes, an int "
                  ">= 1; used with ``store=\"nvme\"`` only (default: {default})",
    "executor": "executor (str, optional): where the update runs: ``\"auto\"`` (on the params' device), "
                "``\"cpu\"`` (the SIMD kernels; with CUDA params through pinned host copies of the params "
                "and grads, ZeRO-Offload style, no state on the GPU), ``\"cuda\"`` (the CUDA kernels "
                "through device slots; CUDA params only) or ``\"hybrid\"`` (CUDA params, ``store=\"cpu\"``: "
                "each step some pages go to the GPU's kernels and the others to the SIMD kernels in host "
                "memory, at the same time, bit for bit either alone) (default: {default})",
    "gpu_fraction": "gpu_fraction (float, optional): with ``executor=\"hybrid\"``, the share of a step's "
                    "pages updated on the GPU, in [0, 1]; None starts at 0.5 (default: {default})",
    "rebalance": "rebalance (bool, optional): with ``executor=\"hybrid\"``, move ``gpu_fraction`` between "
                 "steps toward the split at which both sides take equally long, from their measured "
                 "times; None: only when ``gpu_fraction`` is None (default: {default})",
    "stochastic_rounding": "stochastic_rounding (bool, optional): round a bf16/fp16 param's new value "
                           "stochastically instead of to nearest even; seeded from torch's default "
                           "generator at construction, so ``torch.manual_seed`` makes runs repeatable. "
                           "Excludes ``master_weights`` (default: {default})",
    "master_weights": "master_weights (bool, optional): keep an fp32 master copy of each bf16/fp16 param "
                      "with its state (4 more bytes per element); the kernel updates the master and the "
                      "param becomes it rounded to nearest, so small updates accumulate. No effect on "
                      "fp32 params; excludes ``stochastic_rounding`` (default: {default})",
}


def _wrap(text: str, indent: int = 0, hang: int = 0, width: int = 96) -> str:
    """Fills `text` to `width` columns, indented `indent`; lines after the first `hang` more."""
    return textwrap.fill(text, width=width, initial_indent=" " * indent,
                         subsequent_indent=" " * (indent + hang), break_on_hyphens=False, break_long_words=False)


def adam_math(*, l2: bool | None, bias_correction_arg: bool = False) -> str:
    """The Adam update; l2=None: the weight decay is chosen by ``adamw_mode``."""
    if l2 is None:
        decay = ("    p = p * (1 - lr * weight_decay)      adamw_mode=True: decoupled weight decay\n"
                 "    g = g + weight_decay * p             adamw_mode=False: L2 weight decay")
    else:
        decay = _L2 if l2 else _DECOUPLED
    return _ADAM_MATH.format(decay=decay, no_bias="\n(``m`` and ``v`` as they are with ``bias_correction=False``)"
                             if bias_correction_arg else "")


_BY_OPTIM_BITS = ("With ``optim_bits=8`` (or 4) {it} {are} stored block-quantized instead, as in the 8-bit "
                  "(4-bit) classes: one fp32 absmax per block of ``block_size`` elements and one code per "
                  "element; params with fewer than ``min_8bit_size`` elements keep fp32 state.")


def by_optim_bits(*, plural: bool) -> str:
    """The state sentence of a class whose width ``optim_bits`` picks (fp32 by default)."""
    return _BY_OPTIM_BITS.format(it="they" if plural else "it", are="are" if plural else "is")


def lion_math() -> str:
    return _LION_MATH


def state_text(*, moments: str, plural: bool, fmt: str) -> str:
    """fmt: "fp32", "int8" or "int4"."""
    are = "are" if plural else "is"
    if fmt == "fp32":
        return _STATE_FP32.format(moments=moments, are=are, bytes=8 if plural else 4)
    bits = 8 if fmt == "int8" else 4
    return _STATE_QUANT.format(moments=moments, are=are, bits=bits, maps=_MAPS[bits])


def document(cls, summary: str, *, math: str, state: str, example: str, paged_twin: str | None = None,
             paged_twin8: str | None = None, entries: dict | None = None, block: int | None = None) -> None:
    """Sets ``cls.__doc__``: summary, math, rounding, state and where it lives (paged: its
    bit-for-bit twin), an Args block and an Example. The Args block walks the constructor's
    signature, so every argument is documented in order with its real default; `entries` maps
    an argument to another text of _ARG (weight_decay -> "weight_decay_l2"); `block` is the
    format's default block size; `paged_twin8` the twin at ``optim_bits=8``."""
    paras = [summary, math, _ROUNDING, state + " " + (_PAGED if paged_twin else _IN_MEMORY)]
    if paged_twin:
        paras.append(_SAME_AS.format(twin=paged_twin, twin8=f" (``{paged_twin8}`` at ``optim_bits=8``)"
                                     if paged_twin8 else ""))
    out = [p if "::" in p else _wrap(p) for p in paras]
    lines = ["Args:"]
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        text = _ARG[(entries or {}).get(name, name)]
        default = "" if param.default is inspect.Parameter.empty else repr(param.default)
        lines.append(_wrap(text.format(default=default, block=block), indent=4, hang=4))
    out.append("\n".join(lines))
    out.append("Example:\n" + "\n".join("    " + line for line in example.strip("\n").splitlines()))
    cls.__doc__ = "\n\n".join(out) + "\n"
