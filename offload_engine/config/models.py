"""The typed engine config: one pydantic model per section, a description per key.

Build an EngineConfig with ``load_config`` (loader.py), not by calling the model: the loader
also strips ``_comment`` keys, sorts DeepSpeed-only keys into warnings and errors, resolves the
batch sizes for the world size and checks the settings that involve several sections.
"""
from __future__ import annotations

import functools
import operator
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator

from ..paging.footprint import slot_rule_text
from .base import NonEmptyStr, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Section
from .optimizer_models import OPTIMIZER_SECTIONS
from .scheduler_models import SCHEDULER_SECTIONS

__all__ = [
    "BF16Config",
    "DataParallelConfig",
    "EngineConfig",
    "FP16Config",
    "OffloadOptimizerConfig",
    "OptimizerSection",
    "PagingConfig",
    "SchedulerSection",
    "ZeroConfig",
]

# One section model per type name, told apart by "type" (canonicalized by the loader first).
OptimizerSection = Annotated[functools.reduce(operator.or_, OPTIMIZER_SECTIONS.values()), Field(discriminator="type")]
SchedulerSection = Annotated[functools.reduce(operator.or_, SCHEDULER_SECTIONS.values()), Field(discriminator="type")]


class FP16Config(Section):
    """fp16 mixed precision with loss scaling (DeepSpeed's ``fp16`` section)."""

    enabled: bool = Field(False, description="Train with fp16 params/activations and a scaled loss.")
    loss_scale: NonNegativeFloat = Field(0.0, description="Static loss scale; 0 = dynamic loss scaling.")
    initial_scale_power: Annotated[int, Field(ge=0, le=127)] = Field(
        16, description="Dynamic scaling starts at a loss scale of 2**initial_scale_power (0..127).")
    loss_scale_window: PositiveInt = Field(
        1000, description="Steps without overflow after which the dynamic loss scale is doubled.")
    hysteresis: PositiveInt = Field(2, description="Overflows tolerated before the dynamic loss scale is lowered.")
    consecutive_hysteresis: bool = Field(
        False, description="Refill the hysteresis budget after every step without overflow.")
    min_loss_scale: PositiveFloat = Field(1.0, description="The dynamic loss scale never drops below this.")
    auto_cast: bool = Field(
        False, description="engine(...) casts the floating-point tensors among its inputs (nested in lists, tuples "
                           "and dicts too) to fp16 before the module sees them, as DeepSpeed's auto_cast does; "
                           "with enabled true only.")


class BF16Config(Section):
    """bf16 mixed precision (DeepSpeed's ``bf16`` section; the old key ``bfloat16`` is accepted)."""

    enabled: bool | Literal["auto"] = Field(
        False, description="Train with bf16 params/activations (no loss scaling). \"auto\": bf16 where the params' "
                           "device computes it fast (a CUDA device with bf16; a CPU whose bf16 matmul is measured "
                           "no slower than the fp32 one, as with avx512_bf16 or AMX), fp32 elsewhere; "
                           "initialize() decides and logs why (engine/precision.py).",
        json_schema_extra={"allowed": 'true, false or "auto"'})

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, value):
        # One error naming the key, not one per member of the union (bool | "auto").
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f'must be true or false (or "auto"), got {value!r}')


class OffloadOptimizerConfig(Section):
    """DeepSpeed's ``zero_optimization.offload_optimizer``, mapped onto the paging section:
    device -> paging.store, nvme_path -> paging.nvme_path, buffer_count -> paging.prefetch_depth
    (buffer_count - 2), pin_memory -> paging.pin_memory. As in DeepSpeed, offloading moves the
    update to the CPU: paging.executor becomes 'cpu' unless the paging section sets it."""

    device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where optimizer state rests: 'cpu' (host RAM pages), 'nvme' (a file under nvme_path) "
                            "or 'none' (no offload).")
    nvme_path: NonEmptyStr | None = Field(
        None, description="Directory of the state file; required with device 'nvme' (ignored, with a warning, "
                          "otherwise, as DeepSpeed does).")
    buffer_count: Annotated[int, Field(ge=3)] = Field(
        4, description="Page slots in flight, as DeepSpeed counts them (the NVMe store's host slots with the CPU "
                       "executor): prefetch_depth = buffer_count - 2 (>= 3). DeepSpeed's default 4 is paging's "
                       "default prefetch_depth 2.")
    pin_memory: bool = Field(True, description="Mapped to paging.pin_memory, which is accepted and changes nothing: "
                                               "host pages are pinned exactly when the CUDA executor copies them.")


class ZeroConfig(Section):
    """DeepSpeed's ``zero_optimization`` section. Stages 0, 1 and 2 are accepted and behave the
    same: with several data-parallel ranks the optimizer state is always partitioned (each rank
    keeps 1/world of it) and the grads are all-reduced, then sliced."""

    stage: int = Field(0, description="ZeRO stage: 0, 1 or 2 (3, parameter partitioning, is not supported).",
                       json_schema_extra={"allowed": "0, 1 or 2"})
    offload_optimizer: OffloadOptimizerConfig | None = Field(
        None, description="DeepSpeed's optimizer offload settings (see zero_optimization.offload_optimizer).")

    @field_validator("stage")
    @classmethod
    def _stage(cls, value: int) -> int:
        if value == 3:
            raise ValueError("ZeRO stage 3 (parameter partitioning) is not supported by offload_engine; use 0, 1 or 2")
        if value not in (0, 1, 2):
            raise ValueError(f"must be 0, 1 or 2, got {value}")
        return value


class PagingConfig(Section):
    """Where the optimizer state lives and how pages move (this package's own section)."""

    state_dtype: Literal["fp32", "int8", "int4"] | None = Field(
        None, description="Format of the optimizer state: 'fp32', 'int8' or 'int4' (block-quantized). null = "
                          "the optimizer type's own (fp32 for Adam, AdamW, CPUAdam and Lion).")
    store: Literal["cpu", "nvme", "managed"] | None = Field(
        None, description="Page store of the state: 'cpu' (host RAM), 'nvme' (one file per rank under "
                          "nvme_path) or 'managed' (CUDA managed memory, bitsandbytes' approach; CUDA executor "
                          "only, and never more than the GPU has free). null = no page store (unless zero_optimization.offload_optimizer sets "
                          "one, or the type is a Paged* class, whose default store is 'cpu').")
    nvme_path: NonEmptyStr | None = Field(
        None, description="Directory of the state file; required with store 'nvme', not allowed otherwise.")
    page_size_mb: Annotated[float, Field(gt=0.0, le=65536.0)] = Field(
        16.0, description="Page size in MiB (> 0; fractions allowed, rounded up to whole 4 KiB blocks).")
    prefetch_depth: PositiveInt = Field(
        2, description="Pages fetched ahead of the one being updated (>= 1); " + slot_rule_text() + ".")
    io_threads: PositiveInt = Field(4, description="Threads doing NVMe reads and writes (>= 1).")
    executor: Literal["auto", "cpu", "cuda", "hybrid"] = Field(
        "auto", description="Where the update runs: 'cpu' (SIMD kernels), 'cuda' (CUDA kernels, pages copied to "
                            "the GPU), 'hybrid' (CUDA params: each step some pages are updated on the GPU and the "
                            "others by the SIMD kernels in host memory, at the same time; store 'cpu') or 'auto' "
                            "(CPU params: 'cpu'; CUDA params: the planner's choice from this machine's cached "
                            "probe, `offload-plan probe`, else 'cuda'; docs/plan.md).")
    gpu_fraction: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="With executor 'hybrid': the share of a step's pages updated on the GPU, in [0, 1], to "
                          "start from. null = the planner's split (0.5 without a cached probe).")
    rebalance: bool = Field(
        True, description="With executor 'hybrid': move gpu_fraction between steps toward the split at which both "
                          "sides, at their measured rates, take equally long. false keeps it where it is.")
    master_weights: bool = Field(
        True, description="Keep fp32 master weights for bf16/fp16 params (fp32 params are their own master).")
    overlap: Literal["off", "exact", "delayed"] = Field(
        "off", description="'exact': update each page during backward as soon as its params' grads are final, on "
                           "the micro-batch that ends an accumulation window, bit for bit the step after backward. "
                           "Where clipping or an fp16/non-finite skip could change the step, pages run early as a "
                           "guess that is checked after backward and taken back when wrong (host pages updated by "
                           "the CPU executor; elsewhere they wait). One process (docs/engine.md, \"Overlap with "
                           "backward\"). 'delayed': step t's update runs during step t+1's forward and backward, "
                           "which read the params before step t (one step stale); the update itself is exact for "
                           "step t's grads. CPU executor, any number of ranks (docs/engine.md, \"Delayed "
                           "update\"). 'off': the step runs after backward.")
    overlap_backward: bool = Field(
        False, description="The older spelling of overlap: true means overlap 'exact'.")
    speculation_budget_mb: NonNegativeFloat = Field(
        1024.0, description="With overlap 'exact': host memory (MiB) that may hold the pre-step copies of pages "
                            "(and their params' values) updated before backward ends; pages past it wait for the "
                            "check. 0 = none run early where the check could take them back.")
    delayed_warmup_steps: NonNegativeInt = Field(
        10, description="With overlap 'delayed': the first optimizer steps that run undelayed (the update lands "
                        "before the next forward), while a stale gradient would hurt most.")
    pin_memory: bool = Field(
        True, description="Accepted for DeepSpeed compatibility; it changes nothing. Host pages are pinned "
                          "(page-locked) exactly when the CUDA executor copies them, since asynchronous copies "
                          "need it; the CPU executor updates pages in place or through its own slots, where "
                          "pinning buys nothing.")


class DataParallelConfig(Section):
    """How data-parallel ranks exchange grads and params (this package's own section)."""

    shared_memory: bool = Field(
        True, description="With gloo and CPU params, the ranks of each host keep one copy of the params in shared "
                          "memory (/dev/shm) and hand grads to their owners there instead of over gloo. Across "
                          "several hosts (the same number of ranks on each) the exchange is hierarchical: each "
                          "rank sums its host's grads of one column of slices and only those sums, and the "
                          "updated slices, cross hosts. Falls back to gloo for every rank, with the reason logged, "
                          "where it cannot (too little /dev/shm, unequal or single-rank hosts). false = always gloo.")
    bucket_mb: PositiveFloat = Field(
        4.0, description="With paging.overlap 'exact' and several ranks: grads are averaged to their owners "
                         "during backward in buckets of whole params, in backward order, of at most this many "
                         "MiB of fp32 each (a larger param is a bucket of its own). Smaller buckets reach the "
                         "owners' pages sooner; each costs one message per pair of ranks.")

    @property
    def bucket_elements(self) -> int:
        """bucket_mb in fp32 elements (at least 1)."""
        return max(1, int(self.bucket_mb * 2 ** 20) // 4)


class EngineConfig(Section):
    """A complete engine configuration (DeepSpeed-style JSON). Use ``load_config`` to build one."""

    train_batch_size: PositiveInt | None = Field(
        None, description="Samples per optimizer step over all ranks: train_micro_batch_size_per_gpu * "
                          "gradient_accumulation_steps * world_size.")
    train_micro_batch_size_per_gpu: PositiveInt | None = Field(
        None, description="Samples per forward/backward on one rank.")
    gradient_accumulation_steps: PositiveInt | None = Field(
        None, description="Micro-batches whose gradients are summed before each optimizer step.")
    gradient_clipping: NonNegativeFloat = Field(
        0.0, description="Clip the global gradient norm to this value before each step; 0 = no clipping.")
    steps_per_print: PositiveInt = Field(10, description="Log progress every this many optimizer steps.")
    optimizer: OptimizerSection | None = Field(
        None, description="The optimizer: {\"type\": ..., \"params\": {...}}; null = the caller supplies one.")
    scheduler: SchedulerSection | None = Field(
        None, description="The learning-rate schedule: {\"type\": ..., \"params\": {...}}; null = constant lr.")
    fp16: FP16Config = Field(default_factory=FP16Config, description="fp16 mixed precision.")
    bf16: BF16Config = Field(default_factory=BF16Config, description="bf16 mixed precision.")
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig, description="DeepSpeed ZeRO settings.")
    paging: PagingConfig = Field(default_factory=PagingConfig, description="Optimizer state placement and paging.")
    data_parallel: DataParallelConfig = Field(default_factory=DataParallelConfig,
                                              description="Data-parallel communication.")

    _world_size: int = PrivateAttr(1)

    # ---- resolved views (load_config has checked that each of these resolves) ----------------
    @property
    def world_size(self) -> int:
        """The data-parallel world size the batch sizes were resolved for."""
        return self._world_size

    @property
    def precision(self) -> str:
        """``"bf16"``, ``"fp16"`` or ``"fp32"`` (``bf16.enabled: "auto"`` must be decided first:
        with_bf16)."""
        if self.bf16.enabled == "auto":
            raise ValueError('bf16.enabled is "auto": initialize() decides it for the params\' device (with_bf16)')
        return "bf16" if self.bf16.enabled else "fp16" if self.fp16.enabled else "fp32"

    def with_bf16(self, enabled: bool) -> "EngineConfig":
        """This config with bf16.enabled decided (for ``"auto"``)."""
        cfg = self.model_copy(update={"bf16": self.bf16.model_copy(update={"enabled": bool(enabled)})})
        cfg._world_size = self._world_size
        return cfg

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage (0, 1 or 2)."""
        return self.zero_optimization.stage

    def paging_settings(self):
        """The paging section with zero_optimization.offload_optimizer merged in: the one place the
        engine reads store, nvme_path, prefetch_depth, ... from (a PagingSettings)."""
        from .resolve import merge_paging
        return merge_paging(self)

    def optimizer_spec(self, param_dtype_is_fp32: bool = True):
        """The optimizer class to build and its keywords (an OptimizerSpec), or None when the
        config has no optimizer section. ``param_dtype_is_fp32``: whether the params are fp32
        (then ``master_weights`` is passed as False where the class accepts it)."""
        from .resolve import resolve_optimizer
        return resolve_optimizer(self, param_dtype_is_fp32=param_dtype_is_fp32)
