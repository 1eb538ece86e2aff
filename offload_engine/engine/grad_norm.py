"""The global gradient norm, for clipping and fp16 overflow detection, without gathering the
grads into one tensor: one norm per grad (torch's foreach kernels), then the norm of those.

For fp32 grads this is exactly torch.nn.utils.clip_grad_norm_'s computation (same kernels,
same order), so the engine's clipping coefficient is bit for bit a hand-written loop's.
bf16 grads: torch's own bf16 norm (it accumulates in fp32; each tensor's norm is then rounded
to bf16, a relative error under 2^-8 that clipping does not feel), 9x faster on CPU than
asking for an fp32 result. fp16 grads are normed with an fp32 result: an fp16 norm overflows
(65504) long before the grads do, and would read as a loss-scale overflow.
"""
from __future__ import annotations

import torch

CLIP_EPS = 1e-6  # added to the norm before dividing, as torch.nn.utils.clip_grad_norm_


def global_grad_norm(grads: list) -> torch.Tensor:
    """The 2-norm over all `grads` (a float32 scalar tensor on the first grad's device; inf or
    nan when some grad holds one)."""
    if not grads:
        return torch.tensor(0.0)
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    device = grads[0].device
    by_device: dict = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    norms = []
    for group in by_device.values():
        fp16 = [g for g in group if g.dtype != torch.bfloat16]
        bf16 = [g for g in group if g.dtype == torch.bfloat16]
        if fp16:
            norms += [n.to(device) for n in torch._foreach_norm(fp16, 2, dtype=torch.float32)]
        if bf16:
            norms += [n.to(device, torch.float32) for n in torch._foreach_norm(bf16, 2)]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + eps)) as a tensor, as torch.nn.utils.clip_grad_norm_ computes it."""
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
