"""``bf16: {"enabled": "auto"}``: bf16 where the params' device computes it fast, fp32 elsewhere.

A CUDA device is asked (torch.cuda.is_bf16_supported). A CPU is measured, not guessed from its
name: a bf16 matmul against the same fp32 one (256x512 @ 512x512), on one thread. With
avx512_bf16 or AMX the bf16 one is faster (0.23x on a Zen 4 with avx512_bf16); without them it
is converted to fp32 on the way and is slower: 1.33x on that Zen 4 with oneDNN held to
AVX512_CORE, 4.8x on an AVX-512 Xeon without avx512_bf16 (4.7 ms against 1.0 ms), 41x held to
AVX2. A bf16 run there would be slower than an fp32 one. The measurement takes a few
milliseconds and is made once per process.
"""
from __future__ import annotations

import functools
import time

import torch

# bf16 is chosen when its matmul is no slower than fp32's: the native case (0.23x) and the
# converted one (>= 1.33x) lie well apart, so the choice does not flip between runs.
SLOWDOWN_LIMIT = 1.0
_SHAPE = (256, 512, 512)  # (m, k, n)
_REPEATS = 5


def choose_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether to train in bf16 on `device`, why), for ``bf16.enabled: "auto"``."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no bf16 support"
    if device.type != "cpu":
        return False, f"no bf16 measurement for {device.type} devices"
    ratio = cpu_bf16_slowdown()
    fast = ratio <= SLOWDOWN_LIMIT
    return fast, (f"a bf16 matmul takes {ratio:.2f}x the fp32 one's time on this CPU, so "
                  + ("bf16" if fast else "fp32: bf16 would be slower"))


@functools.lru_cache(maxsize=None)
def cpu_bf16_slowdown() -> float:
    """A bf16 matmul's time over the fp32 one's, on one CPU thread (the best of a few runs each)."""
    m, k, n = _SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel's speed, not the machine's load across cores
    try:
        return _best(a.bfloat16(), b.bfloat16()) / _best(a, b)
    finally:
        torch.set_num_threads(threads)


def _best(a: torch.Tensor, b: torch.Tensor) -> float:
    a @ b  # warm-up: the first call picks the kernel
    best = float("inf")
    for _ in range(_REPEATS):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best
