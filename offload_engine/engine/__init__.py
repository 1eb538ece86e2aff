"""The engine: offload_engine.initialize(model, config) -> (engine, optimizer, dataloader,
lr_scheduler), as deepspeed.initialize."""
from .checkpoint import CheckpointError
from .engine import OffloadEngine
from .initialize import initialize
from .memory import format_memory_report, memory_report

__all__ = ["initialize", "OffloadEngine", "CheckpointError", "memory_report", "format_memory_report"]
