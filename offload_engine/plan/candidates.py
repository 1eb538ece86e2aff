"""The configurations the planner weighs, and the engine config each one is.

A Candidate fixes where the state lives and how it moves: state dtype, store, executor, page
size and prefetch depth. Its config
is the user's (or offload-train's default) with the paging section set to the candidate and
the optimizer type moved to the class of that state dtype, so what the planner sizes is what
initialize() builds.
"""
from __future__ import annotations

import copy
import dataclasses

from ..config.optimizer_models import OPTIMIZER_KINDS
from ..config.resolve import target_class

STATE_DTYPES = ("fp32", "int8")
PAGE_SIZES_MB = (1.0, 4.0, 16.0)
PREFETCH_DEPTHS = (2, 4)


@dataclasses.dataclass(frozen=True)
class Candidate:
    state_dtype: str          # "fp32" | "int8"
    store: str                # "cpu" (host RAM) | "nvme" | "managed"
    executor: str             # "cpu" | "cuda" | "hybrid"
    page_size_mb: float
    prefetch_depth: int
    gpu_fraction: float | None = None  # the hybrid's split, once the planner has chosen it (cost.hybrid_split)

    def label(self) -> str:
        store = {"cpu": "host"}.get(self.store, self.store)
        depth = f" prefetch {self.prefetch_depth}" if self.moves_pages else ""
        executor = self.executor
        if self.gpu_fraction is not None:
            executor = f"hybrid {self.gpu_fraction:.0%} GPU"
        return f"{self.state_dtype} {store} {executor} page {self.page_size_mb:g} MiB{depth}"

    @property
    def moves_pages(self) -> bool:
        """Whether pages travel through slots (and so prefetch depth matters)."""
        return self.store == "nvme" or self.executor != "cpu"

    def paging_section(self, nvme_path: str | None) -> dict:
        section = {"store": self.store, "state_dtype": self.state_dtype, "page_size_mb": self.page_size_mb,
                   "prefetch_depth": self.prefetch_depth, "executor": self.executor}
        if self.gpu_fraction is not None:
            # The planner's split to start from; the engine moves it with the measured phase
            # times (paging.rebalance, on by default).
            section["gpu_fraction"] = round(self.gpu_fraction, 4)
        if self.store == "nvme":
            section["nvme_path"] = nvme_path
        return section


def candidates(gpu: bool, state_dtypes=STATE_DTYPES, stores=None) -> list[Candidate]:
    """Every configuration the planner ranks on this machine: the CPU executor over host RAM
    or NVMe, and with a GPU the CUDA executor (also over managed memory) and the hybrid of the
    two over host RAM (its split chosen when it is costed: cost.hybrid_split)."""
    stores = tuple(stores or (("cpu", "nvme", "managed") if gpu else ("cpu", "nvme")))
    out = []
    for dtype in state_dtypes:
        for store in stores:
            for executor in ("cpu", "cuda", "hybrid") if gpu else ("cpu",):
                if store == "managed" and executor != "cuda":
                    continue  # managed memory is the CUDA executor's
                if executor == "hybrid" and store != "cpu":
                    continue  # its host side updates host pages in place
                for page in PAGE_SIZES_MB:
                    moves = store == "nvme" or executor != "cpu"
                    for depth in PREFETCH_DEPTHS if moves and store != "managed" else PREFETCH_DEPTHS[:1]:
                        out.append(Candidate(dtype, store, executor, page, depth))
    return out


def config_for(base: dict, candidate: Candidate, nvme_path: str | None) -> dict:
    """`base` (an engine config dict) with its state placed as `candidate` says."""
    config = copy.deepcopy(base)
    opt = config.get("optimizer")
    if not isinstance(opt, dict) or opt.get("type") not in OPTIMIZER_KINDS:
        raise ValueError("the base config needs an optimizer section with a known type to plan its state")
    kind = OPTIMIZER_KINDS[opt["type"]]
    params = opt.get("params") or {}
    adamw = kind.adamw if kind.adamw is not None else params.get("adam_w_mode", params.get("adamw_mode", True))
    name = target_class(kind.algorithm, adamw, candidate.state_dtype, True)
    if name is None:
        raise ValueError(f"optimizer.type {opt['type']!r} has no paged class with {candidate.state_dtype} state")
    opt["type"] = name
    if name.endswith(("AdamW", "AdamW8bit")) or kind.algorithm != "adam":
        params.pop("adam_w_mode", None)  # the class says it
    params.pop("adamw_mode", None)
    opt["params"] = params
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        zero.pop("offload_optimizer", None)  # the paging section says where the state lives
    paging = {k: v for k, v in (config.get("paging") or {}).items()
              if k not in ("store", "state_dtype", "page_size_mb", "prefetch_depth", "executor", "nvme_path",
                           "gpu_fraction")}
    config["paging"] = {**paging, **candidate.paging_section(nvme_path)}
    return config
