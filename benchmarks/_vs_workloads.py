"""What vs_deepspeed.py trains, identically for every contender: the models, the seeded global
batches each rank takes its share of, the hyperparameters, the contenders' configs, and how
each one's optimizer state is counted by tier (GPU, host RAM, NVMe).

Everything here is deterministic from the seeds: every contender starts from the same params
and sees the same global batch at every step, so the fp32-state runs follow one loss curve
(up to the order of the grad reduction's sums)."""
from __future__ import annotations

import dataclasses
import os

import torch
from torch.nn import functional as F

# AdamW for everyone; no clipping, fp32 params (the CPU accelerator's DeepSpeed trains fp32 as
# it is, and one precision keeps the math the same on both sides).
HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
WORLD = 2  # data-parallel ranks of the CPU jobs (2 cores: one intra-op thread per rank)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and its data. `micro_batch` samples of `seq` tokens per rank per step; the global
    batch is micro_batch * world (a one-process GPU job takes all of it)."""
    name: str
    kind: str            # "linear" or "gpt"
    dim: int
    layers: int
    heads: int = 0
    seq: int = 1
    micro_batch: int = 4

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)  # the same initial params for every contender and rank
        if self.kind == "linear":
            return torch.nn.Sequential(*[torch.nn.Linear(self.dim, self.dim) for _ in range(self.layers)])
        from offload_engine.train.models import GPT, GPTSize
        return GPT(GPTSize(dim=self.dim, layers=self.layers, heads=self.heads, context=self.seq))

    def describe(self) -> str:
        if self.kind == "linear":
            return f"{self.layers}x Linear({self.dim}, {self.dim})"
        return f"GPT, {self.layers} layers, width {self.dim}, {self.heads} heads"


# linear8 is the brief's 8x Linear(1024) at micro-batch 4 (one 1024-wide row per sample); the
# GPTs are offload-train's decoder (byte vocabulary, tied embedding) at three widths.
WORKLOADS = {w.name: w for w in [
    Workload("linear8", "linear", dim=1024, layers=8, seq=1),
    Workload("gpt-3m", "gpt", dim=256, layers=4, heads=4, seq=32),
    Workload("gpt-13m", "gpt", dim=512, layers=4, heads=8, seq=32),
    Workload("gpt-43m", "gpt", dim=768, layers=6, heads=12, seq=32),
    Workload("tiny-linear", "linear", dim=64, layers=2, seq=1),        # tests
    Workload("tiny-gpt", "gpt", dim=64, layers=1, heads=2, seq=8),     # tests
    # GPU-only sizes: large enough that a step is not launch overhead.
    Workload("gpt-350m", "gpt", dim=1024, layers=28, heads=16, seq=256, micro_batch=8),
]}


class Batches:
    """Step `i`'s global batch from a generator seeded with `i`, so every contender, rank count
    and restart draws the same one; `take(i, rank, world)` is this rank's contiguous share."""

    def __init__(self, workload: Workload, device="cpu"):
        self.w = workload
        self.device = device
        if workload.kind == "gpt":
            from offload_engine.train.data import load_corpus
            self.tokens = load_corpus(None).tokens

    def take(self, step: int, rank: int, world: int):
        w = self.w
        total = w.micro_batch * WORLD
        if total % world:
            raise ValueError(f"the global batch of {total} samples does not split over {world} ranks")
        g = torch.Generator().manual_seed(10_000 + step)
        if w.kind == "linear":
            x = torch.randn(total, w.seq, w.dim, generator=g)
            y = torch.randn(total, w.seq, w.dim, generator=g)
        else:
            starts = torch.randint(0, len(self.tokens) - w.seq - 1, (total,), generator=g).tolist()
            windows = torch.stack([self.tokens[s:s + w.seq + 1] for s in starts])
            x, y = windows[:, :-1], windows[:, 1:]
        mine = slice(rank * total // world, (rank + 1) * total // world)
        return x[mine].to(self.device), y[mine].to(self.device)

    def tokens_per_step(self) -> int:
        return self.w.micro_batch * WORLD * self.w.seq


def loss_of(workload: Workload, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if workload.kind == "linear":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# ---- the contenders' configs ---------------------------------------------------------------------
def _base(workload: Workload, micro_batch: int, clip: float = 0.0) -> dict:
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": clip, "steps_per_print": 1 << 30,
            "optimizer": {"type": "AdamW", "params": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in HYPER.items()}}}


def deepspeed_config(contender: str, workload: Workload, nvme_path: str | None, clip: float = 0.0,
                     micro_batch: int | None = None) -> dict:
    """DeepSpeed's settings are its defaults except what the comparison names: the ZeRO stage
    and where the optimizer state goes (pin_memory, buffer counts, sub-group size, aio: defaults).
    `micro_batch`: per rank (default the workload's, at WORLD ranks)."""
    cfg = _base(workload, micro_batch or workload.micro_batch, clip)
    cfg["wall_clock_breakdown"] = False
    if contender == "ds-zero2-cpu":
        cfg["zero_optimization"] = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    elif contender == "ds-zero3-nvme":
        # Params stay in the (CPU accelerator's) device memory, as ours do: only optimizer
        # state goes through NVMe on both sides.
        cfg["zero_optimization"] = {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": nvme_path},
                                    "offload_param": {"device": "none"}}
    else:
        raise ValueError(f"not a DeepSpeed contender: {contender!r}")
    return cfg


def ours_config(contender: str, workload: Workload, nvme_path: str | None, micro_batch: int,
                clip: float = 0.0) -> dict:
    """Our engine's config: the same base as DeepSpeed's, with the paging section choosing the
    store, the executor and the state format."""
    cfg = _base(workload, micro_batch, clip)
    paging = {
        "ours-host": {"store": "cpu", "executor": "cpu"},
        "ours-nvme": {"store": "nvme", "executor": "cpu", "nvme_path": nvme_path, "page_size_mb": 4},
        "ours-8bit": {"store": "cpu", "executor": "cpu", "state_dtype": "int8"},
        "ours-nvme-8bit": {"store": "nvme", "executor": "cpu", "nvme_path": nvme_path, "page_size_mb": 4,
                           "state_dtype": "int8"},
        # paging.overlap "delayed" (one step stale, so not held to the fp32 runs' loss): each step's
        # update runs during the next step's forward and backward, from the first step on.
        "ours-host-delayed": {"store": "cpu", "executor": "cpu", "overlap": "delayed", "delayed_warmup_steps": 0},
        "ours-nvme-delayed": {"store": "nvme", "executor": "cpu", "nvme_path": nvme_path, "page_size_mb": 4,
                              "overlap": "delayed", "delayed_warmup_steps": 0},
        # paging.overlap "exact" (bit for bit the step after backward): each owner's pages run as
        # its grads arrive during backward, which reduces them over gloo a bucket at a time; the
        # -gloo rows are overlap off on that same transport (shared-memory params off).
        "ours-host-exact": {"store": "cpu", "executor": "cpu", "overlap": "exact"},
        "ours-nvme-exact": {"store": "nvme", "executor": "cpu", "nvme_path": nvme_path, "page_size_mb": 4,
                            "overlap": "exact"},
        "ours-host-gloo": {"store": "cpu", "executor": "cpu"},
        "ours-nvme-gloo": {"store": "nvme", "executor": "cpu", "nvme_path": nvme_path, "page_size_mb": 4},
        "gpu-ours-host": {"store": "cpu", "executor": "cuda"},
        "gpu-ours-host-8bit": {"store": "cpu", "executor": "cuda", "state_dtype": "int8"},
    }.get(contender)
    if paging is None:
        raise ValueError(f"not one of our engine's contenders: {contender!r}")
    cfg["paging"] = paging
    if contender.endswith("-gloo"):
        cfg["data_parallel"] = {"shared_memory": False}
    return cfg


# ---- optimizer state by tier ------------------------------------------------------------------
def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def dir_bytes(path: str | None) -> int:
    """Bytes allocated on disk under `path` (st_blocks, so sparse files count what they use)."""
    total = 0
    for root, _, files in os.walk(path or "/nonexistent"):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def ours_state_tiers(engine) -> dict:
    """{"gpu", "host", "nvme"} bytes of this rank's optimizer state, from the engine's report."""
    o = engine.memory_report()["optimizer"]
    if "store_bytes" not in o:  # not paged: the state tensors where they are
        by_dev = o.get("state_bytes_by_device", {})
        return {"gpu": sum(v for k, v in by_dev.items() if k.startswith("cuda")),
                "host": sum(v for k, v in by_dev.items() if k == "cpu"), "nvme": 0}
    at_rest = {"gpu": 0, "host": 0, "nvme": 0}
    at_rest["nvme" if o["store"] == "nvme" else "host"] += o["store_bytes"]
    at_rest["host"] += o["pool_bytes"] if o["store"] == "nvme" else 0  # the NVMe store's slot pool
    at_rest["gpu"] += o["device_pool_bytes"]
    return at_rest


def deepspeed_state_tiers(engine, nvme_path: str | None) -> dict:
    """This rank's optimizer state under DeepSpeed: the fp32 master partition and the moments
    (ZeRO-2 with CPU offload keeps all three in host RAM); with NVMe offload, the swap files on
    disk and the host swap buffers."""
    opt = engine.optimizer
    tiers = {"gpu": 0, "host": 0, "nvme": 0}
    swapper = getattr(opt, "optimizer_swapper", None)
    if swapper is not None:
        tiers["nvme"] = dir_bytes(nvme_path)
        tiers["host"] = _nbytes(swapper.swap_buffer_manager.all_buffers)
        return tiers
    masters = list(getattr(opt, "single_partition_of_fp32_groups", []))
    moments = [v for s in opt.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.numel() > 1]
    for t in masters + moments:
        tiers["gpu" if t.device.type == "cuda" else "host"] += t.numel() * t.element_size()
    return tiers
