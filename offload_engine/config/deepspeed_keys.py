"""DeepSpeed config keys that are not part of offload_engine's own schema, sorted in two kinds:

  * ``hint``: a performance, logging or bookkeeping setting whose absence changes neither the
    numbers nor what gets saved. Accepted; one ConfigWarning per key says it has no effect.
  * ``unsupported``: a setting with real semantics (numerics, data, checkpoint contents, model
    code) that offload_engine does not implement. A ConfigError per key, except when the value
    given is what offload_engine does anyway (``null``, a section with ``"enabled": false``, or
    the listed DeepSpeed default): then only a warning, so a DeepSpeed config that spells out its
    defaults still loads.

Two rules come before the tables: the ZeRO-3 keys (``offload_param``, ``cpu_offload_param``,
``stage3_*`` and the table's other ZeRO-3 settings) in a config of stage 0-2 only warn, because
DeepSpeed ignores them there; and the deprecated ``zero_optimization.cpu_offload`` is mapped to
``offload_optimizer`` as DeepSpeed maps it. Any other unknown key is an error with a did-you-mean
(validation.py). The tables below are
also printed in docs/config.md (docs.py), so the documentation cannot drift from the behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import join_path, show

__all__ = ["DEEPSPEED_KEYS", "STAGE3_PREFIX", "DeepSpeedKey", "sort_deepspeed_keys"]

HINT, UNSUPPORTED = "hint", "unsupported"


@dataclass(frozen=True)
class DeepSpeedKey:
    kind: str             # HINT | UNSUPPORTED
    reason: str           # HINT: why it changes nothing here; UNSUPPORTED: the feature it controls
    harmless: tuple = ()  # values of an UNSUPPORTED key that match offload_engine's behaviour
    instead: str = ""     # UNSUPPORTED: what to do instead, when there is something


def _hint(reason):
    return DeepSpeedKey(HINT, reason)


def _unsupported(feature, *harmless, instead=""):
    return DeepSpeedKey(UNSUPPORTED, feature, harmless, instead)


_PERF = "a DeepSpeed performance hint"
_LOG = "DeepSpeed logging/profiling"
_COMM = "a DeepSpeed communication performance hint"

# section path -> key -> classification. "" is the top level.
DEEPSPEED_KEYS: dict[str, dict[str, DeepSpeedKey]] = {
    "": {
        "wall_clock_breakdown": _hint(_LOG), "memory_breakdown": _hint(_LOG), "flops_profiler": _hint(_LOG),
        "tensorboard": _hint(_LOG), "wandb": _hint(_LOG), "csv_monitor": _hint(_LOG), "comet": _hint(_LOG),
        "comms_logger": _hint(_LOG), "timers": _hint(_LOG), "dump_state": _hint(_LOG), "log_level": _hint(_LOG),
        "autotuning": _hint("DeepSpeed's autotuner settings, read by its launcher"),
        "aio": _hint("DeepSpeed's async-IO tuning; NVMe IO here is set by paging.io_threads"),
        "zero_allow_untested_optimizer": _hint("a DeepSpeed permission flag for client optimizers; this engine "
                                               "has no such gate"),
        "zero_force_ds_cpu_optimizer": _hint("a DeepSpeed permission flag; the optimizer is chosen by "
                                             "optimizer.type and the paging section"),
        "disable_allgather": _hint(_COMM), "disable_python_gc": _hint(_PERF),
        "vocabulary_size": _hint("used by DeepSpeed's data-efficiency features only"),
        "activation_checkpointing": _hint("read by deepspeed.checkpointing.configure(), which model code calls "
                                          "itself; DeepSpeed's engine reads nothing from it, nor does this one "
                                          "(checkpoint in the model, with torch.utils.checkpoint)"),
        "cuda_visible_devices": _hint("DeepSpeed's engine does not read it either; the launcher picks the devices "
                                      "(CUDA_VISIBLE_DEVICES, deepspeed --include)"),
        "amp": _unsupported("NVIDIA Apex AMP", instead="use bf16 or fp16"),
        "torch_autocast": _unsupported("torch.autocast managed by the engine", instead="use bf16 or fp16"),
        "compile": _unsupported("torch.compile managed by the engine", instead="compile the model yourself"),
        "sparse_gradients": _unsupported("sparse embedding gradients", False),
        "prescale_gradients": _hint("where DeepSpeed divides the gradients by the world size, before or after "
                                    "the all-reduce; the average is the same, and offload_engine divides once, "
                                    "after the sum"),
        "gradient_predivide_factor": _hint("how DeepSpeed splits the division by the world size around the "
                                           "all-reduce; the average is the same, and offload_engine divides once, "
                                           "after the sum"),
        "gradient_allreduce_op": _unsupported("summing instead of averaging gradients", "mean"),
        "communication_data_type": _unsupported("all-reduce in a lower precision"),
        "seq_parallel_communication_data_type": _unsupported("sequence parallelism", "fp32"),
        "managed_gradient_accumulation": _unsupported("DeepSpeed-managed accumulation buffers", False),
        "data_types": _unsupported("gradient accumulation in a chosen dtype"),
        "dataloader_drop_last": _unsupported("the engine builds no data loader", False),
        "checkpoint": _unsupported("DeepSpeed's checkpoint options (offload_engine checkpoints hold logical state)"),
        "pipeline": _unsupported("pipeline parallelism"), "tensor_parallel": _unsupported("tensor parallelism"),
        "expert_parallel": _unsupported("expert parallelism"),
        "use_data_before_expert_parallelism": _unsupported("expert parallelism", False),
        "hybrid_engine": _unsupported("DeepSpeed's RLHF hybrid engine"),
        "data_efficiency": _unsupported("curriculum learning and data routing"),
        "curriculum_learning": _unsupported("curriculum learning"),
        "compression_training": _unsupported("compression-aware training"),
        "quantize_training": _unsupported("quantization-aware training"),
        "weight_quantization": _unsupported("quantized weights"),
        "sparse_attention": _unsupported("DeepSpeed's sparse attention kernels"),
        "eigenvalue": _unsupported("eigenvalue-based adaptive training"),
        "progressive_layer_drop": _unsupported("progressive layer dropping"),
        "elasticity": _unsupported("elastic training"), "nebula": _unsupported("Nebula checkpointing"),
        "datastates": _unsupported("DataStates checkpointing"),
    },
    "zero_optimization": {
        **{key: _hint(_COMM) for key in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size",
                                         "allgather_bucket_size", "reduce_scatter", "allgather_partitions",
                                         "round_robin_gradients", "use_multi_rank_bucket_allreduce")},
        "sub_group_size": _hint(_PERF), "memory_efficient_linear": _hint(_PERF),
        "ignore_unused_parameters": _hint("a ZeRO-3 check"), "log_trace_cache_warnings": _hint(_LOG),
        "enable_sanity_checks": _hint("DeepSpeed's internal checks"), "override_module_apply": _hint(_PERF),
        "pipeline_loading_checkpoint": _hint(_PERF),
        "offload_param": _unsupported("parameter offload (ZeRO-3/Infinity)",
                                      instead="only optimizer state is offloaded: use offload_optimizer"),
        "elastic_checkpoint": _unsupported("elastic checkpoints", False),
        "load_from_fp32_weights": _unsupported("choosing where master weights are restored from", True),
        "compute_grad_norm": _unsupported("skipping the gradient norm", True),
        "legacy_stage1": _unsupported("the legacy ZeRO-1 implementation", False),
        "parameter_alignment": _unsupported("parameter alignment for partitioning", False),
        "zero_quantized_weights": _unsupported("ZeRO++ quantized weights", False),
        "zero_quantized_nontrainable_weights": _unsupported("ZeRO++ quantized weights", False),
        "zero_quantized_gradients": _unsupported("ZeRO++ quantized gradients", False),
        "zero_hpz_partition_size": _unsupported("ZeRO++ hierarchical partitioning", 1),
        "mics_shard_size": _unsupported("MiCS sharding", -1),
        "mics_hierarchical_params_gather": _unsupported("MiCS sharding", False),
        # cpu_offload is mapped to offload_optimizer before this table is read (_map_cpu_offload).
        "cpu_offload_param": _unsupported("DeepSpeed's deprecated parameter offload switch (ZeRO-3)", False),
        "cpu_offload_use_pin_memory": _hint("DeepSpeed's deprecated pinning switch, which DeepSpeed no longer maps "
                                            "to anything (pinning is offload_optimizer.pin_memory)"),
        "zenflow": _unsupported("ZenFlow's asynchronous updates"),
        "leaf_module": _unsupported("ZeRO-3 leaf modules"),
        "save_muon_momentum_buffer_in_memory": _unsupported("the Muon optimizer", False),
        **{key: _unsupported("a ZeRO-3 setting (parameter partitioning)")
           for key in ("prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
                       "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save",
                       "module_granularity_threshold", "use_all_reduce_for_fetch_params", "allgather_sequential")},
    },
    "zero_optimization.offload_optimizer": {
        "pipeline_read": _hint(_PERF), "pipeline_write": _hint(_PERF),
        "fast_init": _hint(_PERF), "cpuadam_cores_perc": _hint(_PERF),
        "ratio": _unsupported("offloading only part of the state", 1, 1.0,
                              instead="paging.executor 'hybrid' updates part of the state on the GPU and the "
                                      "rest on the CPU each step: DeepSpeed's ratio is 1 - paging.gpu_fraction"),
        "super_offload": _unsupported("SuperOffload for superchips", False),
    },
    "fp16": {
        "fp16_master_weights_and_grads": _unsupported("fp16 master weights", False),
    },
    "bf16": {
        "immediate_grad_update": _hint(_PERF),
        "check_grad_overflow": _unsupported("skipping steps with non-finite bf16 gradients"),
        "bf16_master_weights_and_grads": _unsupported("bf16 master weights", False,
                                                      instead="see paging.master_weights"),
        "bf16_optimizer_states": _unsupported("bf16 optimizer state", False, instead="see paging.state_dtype"),
    },
    "optimizer": {"legacy_fusion": _hint(_PERF)},
    "optimizer.params": {
        "torch_adam": _hint("DeepSpeed's switch to torch.optim's Adam; offload_engine always runs its own kernels, "
                            "with the same math"),
        "foreach": _hint("a torch.optim implementation switch"),
        "set_grad_none": _hint("how DeepSpeed's FusedAdam clears gradients in zero_grad"),
        "fp32_optimizer_states": _unsupported("non-fp32 state in DeepSpeed's CPU optimizers", True,
                                              instead="see paging.state_dtype"),
        "max_grad_norm": _unsupported("clipping inside the optimizer",
                                      instead="use the top-level gradient_clipping"),
    },
}
# Any zero_optimization key with this prefix is a ZeRO-3 setting.
STAGE3_PREFIX = "stage3_"
_STAGE3 = _unsupported("a ZeRO-3 setting (parameter partitioning)")
# zero_optimization keys DeepSpeed reads at stage 3 only: at stages 0-2 it ignores them, and so do we
# (with a warning), because configs generated for any stage carry them (DeepSpeed-Chat's always do).
_STAGE3_ONLY = {"offload_param", "cpu_offload_param"}


def _harmless(key: DeepSpeedKey, value) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        if not value:  # {}: DeepSpeed's defaults, which leave these features off
            return True
        if "enabled" in value:
            return value["enabled"] is False
        if "device" in value:  # offload_param: {"device": "none", ...}
            return value["device"] == "none"
        return False
    for ok in key.harmless:
        if isinstance(ok, bool) or isinstance(value, bool):
            if value is ok:
                return True
        elif type(value) in (int, float, str) and type(ok) in (int, float, str) and value == ok:
            return True
    return False


def _lookup(section: str, name) -> DeepSpeedKey | None:
    if not isinstance(name, str):
        return None
    table = DEEPSPEED_KEYS.get(section, {})
    if name in table:
        return table[name]
    if section == "zero_optimization" and name.startswith(STAGE3_PREFIX):
        return _STAGE3
    return None


def _stage3_only(section: str, name, key: DeepSpeedKey) -> bool:
    return section == "zero_optimization" and (name in _STAGE3_ONLY or key is _STAGE3 or
                                               key.reason == _STAGE3.reason)


def _sort_section(data: dict, section: str, errors: list, warnings: list, skip=(), zero_stage=None) -> None:
    for name in list(data):
        key = _lookup(section, name)
        if key is None or name in skip:
            continue
        value = data.pop(name)
        path = join_path(section, name)
        if zero_stage is not None and zero_stage < 3 and _stage3_only(section, name, key):
            warnings.append(f"{path} applies at ZeRO stage 3 only ({key.reason}); DeepSpeed ignores it at stage "
                            f"{zero_stage}, and so does offload_engine")
        elif key.kind == HINT:
            warnings.append(f"{path} has no effect in offload_engine ({key.reason}); ignored")
        elif _harmless(key, value):
            warnings.append(f"{path} = {show(value)} keeps DeepSpeed's default, which is what offload_engine does "
                            f"({key.reason} is not supported); ignored")
        else:
            instead = f"; {key.instead}" if key.instead else ""
            errors.append((path, f"{key.reason} is not supported by offload_engine{instead}; remove the key"))


def _map_cpu_offload(zero: dict, errors: list, warnings: list) -> None:
    """DeepSpeed's deprecated ``zero_optimization.cpu_offload``, mapped as DeepSpeed maps it: true is
    ``offload_optimizer: {"device": "cpu"}``, false nothing; given beside ``offload_optimizer`` it
    is an error, as in DeepSpeed (two spellings of one setting)."""
    if "cpu_offload" not in zero:
        return
    value = zero.pop("cpu_offload")
    path = "zero_optimization.cpu_offload"
    if value is None:
        return
    if not isinstance(value, bool):
        errors.append((path, f"must be true or false (DeepSpeed's deprecated spelling of offload_optimizer), "
                             f"got {show(value)}"))
    elif zero.get("offload_optimizer") is not None:
        errors.append((path, "is DeepSpeed's deprecated spelling of offload_optimizer, which is given too; "
                             "keep offload_optimizer and remove cpu_offload (DeepSpeed refuses both as well)"))
    elif value:
        zero["offload_optimizer"] = {"device": "cpu"}
        warnings.append(f"{path} = true is deprecated; read as offload_optimizer: {{\"device\": \"cpu\"}}, "
                        "as DeepSpeed reads it")
    else:
        warnings.append(f"{path} = false is deprecated and changes nothing; ignored")


def sort_deepspeed_keys(data: dict, optimizer_algorithm=None) -> tuple[list[tuple[str, str]], list[str]]:
    """Removes the DeepSpeed-only keys from ``data`` (a private copy) and returns (errors,
    warnings). ``optimizer_algorithm``: "adam"/"lion" when the optimizer type is known, so that
    Adam-only switches are accepted only for Adam types."""
    errors: list[tuple[str, str]] = []
    warnings: list[str] = []
    _sort_section(data, "", errors, warnings)
    zero = data.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    stage = stage if isinstance(stage, int) and not isinstance(stage, bool) else None  # a bad one: models.py says
    if isinstance(zero, dict):
        _map_cpu_offload(zero, errors, warnings)
    for section in ("fp16", "bf16", "zero_optimization", "optimizer"):
        if isinstance(data.get(section), dict):
            _sort_section(data[section], section, errors, warnings, zero_stage=stage)
    if isinstance(zero, dict) and isinstance(zero.get("offload_optimizer"), dict):
        offload = zero["offload_optimizer"]
        _sort_section(offload, "zero_optimization.offload_optimizer", errors, warnings)
        # DeepSpeed reads nvme_path only for device "nvme"; a leftover path is ignored, not an error.
        if offload.get("nvme_path") is not None and offload.get("device", "none") in ("none", "cpu"):
            warnings.append(f"zero_optimization.offload_optimizer.nvme_path is ignored with device "
                            f"{offload.get('device', 'none')!r} (it is read only with device 'nvme')")
            del offload["nvme_path"]
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("params"), dict):
        # torch_adam and its foreach exist only for DeepSpeed's Adam types: elsewhere, unknown keys.
        skip = () if optimizer_algorithm == "adam" else ("torch_adam", "foreach")
        _sort_section(optimizer["params"], "optimizer.params", errors, warnings, skip)
    return errors, warnings
