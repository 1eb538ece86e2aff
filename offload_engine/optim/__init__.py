"""Drop-in torch.optim optimizers backed by this project's kernels."""
from .cpu_adam import CPUAdam

__all__ = ["CPUAdam"]
