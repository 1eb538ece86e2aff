"""offload_engine: Paged Adam. Optimizer state in host RAM or on NVMe, streamed a page at a
time to where the update runs (a SIMD CPU kernel or a CUDA kernel) and back.

    from offload_engine.optim import CPUAdam
"""
__version__ = "0.1.0"
