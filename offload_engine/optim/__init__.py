"""Drop-in torch.optim optimizers backed by this project's kernels."""
from .adam import Adam4bit, Adam8bit, AdamW4bit, AdamW8bit, CPUAdam
from .lion import Lion, Lion8bit
from .paged_classes import PagedAdam, PagedAdam8bit, PagedAdamW, PagedAdamW8bit, PagedLion, PagedLion8bit
from .sharded import record_full_sizes

__all__ = ["CPUAdam", "Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit", "Lion", "Lion8bit", "PagedAdam", "PagedAdamW",
           "PagedAdam8bit", "PagedAdamW8bit", "PagedLion", "PagedLion8bit", "record_full_sizes"]
