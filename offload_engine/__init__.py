"""offload_engine: Paged Adam. Optimizer state in host RAM or on NVMe, streamed a page at a
time to where the update runs (a SIMD CPU kernel or a CUDA kernel) and back.

    from offload_engine.optim import PagedAdamW8bit            # drop-in optimizers
    engine, opt, loader, sched = offload_engine.initialize(model, "configs/paged_adamw.json")
"""
__version__ = "0.1.0"


def initialize(model, config, model_parameters=None, optimizer=None, lr_scheduler=None, training_data=None):
    """As deepspeed.initialize: returns ``(engine, optimizer, dataloader, lr_scheduler)``
    (offload_engine/engine/initialize.py; the config keys: docs/config.md)."""
    from .engine import initialize as _initialize  # the engine and its config load on first use

    return _initialize(model, config, model_parameters=model_parameters, optimizer=optimizer,
                       lr_scheduler=lr_scheduler, training_data=training_data)
