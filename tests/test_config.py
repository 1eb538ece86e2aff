"""The engine config (offload_engine/config): the example files load and build their optimizer,
each kind of mistake gives one ConfigError naming the key, DeepSpeed-only keys warn or fail as
documented, the batch and optimizer resolution tables hold, arbitrary JSON never raises anything
but ConfigError, and docs/config.md is what the generator prints."""
import copy
import inspect
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from offload_engine import optim
from offload_engine.config import (
    ConfigError,
    ConfigWarning,
    EngineConfig,
    OptimizerSpec,
    load_config,
)
from offload_engine.config.base import BLOCK_SIZES
from offload_engine.config.docs import render
from offload_engine.config.introspect import submodel
from offload_engine.config.optimizer_models import OPTIMIZER_KINDS, PARAMS_MODELS
from offload_engine.config.resolve import accepted_keywords, resolve_batch
from offload_engine.quant import codec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "configs").glob("*.json"))
ENGINE_KEYS = ("master_weights", "pin_memory")  # passed only where the constructor takes them


def load(config, world_size=1):
    """load_config with its ConfigWarnings silenced (the tests that check warnings use pytest.warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(config, world_size=world_size)


def one_error(config, world_size=1) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(config, world_size)
    err = info.value
    assert len(err.errors) == 1, err.errors
    return err


def opt(type_name, **params):
    return {"type": type_name, "params": params}


# ---- the example files -----------------------------------------------------------------------
def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"paged_adamw.json", "paged_adamw8bit.json", "nvme.json", "cpu_adam.json",
                                          "deepspeed_compat.json"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_builds_its_optimizer(path, tmp_path):
    cfg = load(path)
    assert isinstance(cfg, EngineConfig)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert isinstance(getattr(cfg, key), int) and getattr(cfg, key) >= 1
    spec = cfg.optimizer_spec()
    assert isinstance(spec, OptimizerSpec) and hasattr(optim, spec.name)
    kwargs = dict(spec.kwargs)
    if "nvme_path" in kwargs:
        kwargs["nvme_path"] = str(tmp_path)
    p = torch.nn.Parameter(torch.randn(300))
    optimizer = getattr(optim, spec.name)([p], **kwargs)
    p.grad = torch.randn(300)
    optimizer.step()
    assert torch.isfinite(p).all()


def test_examples_are_commented_and_readme_lists_them():
    readme = (ROOT / "configs" / "README.md").read_text()
    for path in EXAMPLES:
        assert path.name in readme
        assert "_comment" in json.loads(path.read_text())


def test_deepspeed_compat_example_warns_for_its_hints_only():
    with pytest.warns(ConfigWarning) as record:
        cfg = load_config(ROOT / "configs" / "deepspeed_compat.json")
    messages = [str(w.message) for w in record]
    assert any("zero_optimization.overlap_comm" in m for m in messages)
    assert cfg.zero_stage == 2 and cfg.precision == "bf16" and cfg.gradient_clipping == 1.0
    assert cfg.paging_settings().store == "cpu" and cfg.paging_settings().executor == "cpu"
    assert cfg.optimizer_spec().name == "PagedAdamW"


# ---- one clear error per mistake ---------------------------------------------------------------
BAD = [
    # (config, key path, words the message must contain)
    ({"gradient_cliping": 1.0}, "gradient_cliping", ["did you mean 'gradient_clipping'"]),
    ({"paging": {"prefetch_dept": 2}}, "paging.prefetch_dept", ["did you mean 'prefetch_depth'"]),
    ({"optimizer": opt("AdamW", betaz=[0.9, 0.99])}, "optimizer.params.betaz", ["did you mean 'betas'"]),
    ({"zero_optimization": {"offload_optimizer": {"devise": "cpu"}}}, "zero_optimization.offload_optimizer.devise",
     ["did you mean 'device'"]),
    ({"optimizer": opt("AdamW", lr="1e-3")}, "optimizer.params.lr", ["a number >= 0", "'1e-3'"]),
    ({"bf16": {"enabled": "yes"}}, "bf16.enabled", ["true or false", "'yes'"]),
    ({"bf16": {"enabled": 1}}, "bf16.enabled", ["true or false"]),
    ({"steps_per_print": 2.0}, "steps_per_print", ["an integer"]),
    ({"optimizer": opt("AdamW", lr=-1e-3)}, "optimizer.params.lr", [">= 0", "-0.001"]),
    ({"optimizer": opt("AdamW", lr=float("nan"))}, "optimizer.params.lr", ["NaN"]),
    ({"optimizer": opt("Adam", betas=[0.9, 1.0])}, "optimizer.params.betas", ["2 numbers", "< 1"]),
    ({"optimizer": opt("Adam", betas=[0.9])}, "optimizer.params.betas", ["2 numbers"]),
    ({"optimizer": opt("AdamW8bit", block_size=100)}, "optimizer.params.block_size", ["power of two"]),
    ({"optimizer": opt("AdamW", amsgrad=True)}, "optimizer.params.amsgrad", ["not supported"]),
    ({"optimizer": opt("PagedAdamW8bt")}, "optimizer.type", ["did you mean 'PagedAdamW8bit'"]),
    ({"optimizer": {"params": {"lr": 1e-3}}}, "optimizer.type", ["required", "'PagedAdamW'"]),
    ({"optimizer": opt("Lamb")}, "optimizer.type", ["does not provide"]),
    ({"optimizer": "AdamW"}, "optimizer", ["must be an object"]),
    ({"optimizer": opt("PagedAdamW", store="nvme")}, "optimizer.params.store", ["paging"]),
    ({"optimizer": opt("AdamW", max_grad_norm=1.0)}, "optimizer.params.max_grad_norm", ["gradient_clipping"]),
    ({"optimizer": opt("Lion", torch_adam=True)}, "optimizer.params.torch_adam", ["unknown key"]),
    ({"optimizer": opt("AdamW", adam_w_mode=False)}, "optimizer.params.adam_w_mode", ["type 'Adam'"]),
    ({"optimizer": opt("CPUAdam", adamw_mode=True, adam_w_mode=False)}, "optimizer.params.adam_w_mode",
     ["disagree"]),
    ({"optimizer": opt("AdamW", bias_correction=False), "paging": {"store": "cpu"}},
     "optimizer.params.bias_correction", ["CPUAdam"]),
    ({"optimizer": opt("CPUAdam", block_size=256)}, "optimizer.params.block_size", ["CPUAdam"]),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "scheduler.params.total_num_steps", ["required"]),
    ({"scheduler": {"type": "WarmupCosineLR"}}, "scheduler.params", ["total_num_steps"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}}, "scheduler.params.warmup_type",
     ["'log' or 'linear'"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": [0.1, "x"]}}}, "scheduler.params.warmup_min_lr",
     ["list"]),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type", ["does not provide"]),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 500}}}, "scheduler.params.total_num_steps",
     ["warmup_num_steps (1000"]),
    ({"scheduler": {"type": "WarmupLinearLR"}}, "scheduler.type", ["did you mean"]),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, "train_batch_size", ["30", "4", "multiple"]),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
     "train_batch_size", ["32", "= 8"]),
    ({"train_batch_size": 0}, "train_batch_size", [">= 1"]),
    ({"paging": {"page_size_mb": "auto"}}, "paging.page_size_mb", ["Hugging Face"]),
    ({"gradient_clipping": "auto"}, "gradient_clipping", ["max_grad_norm"]),
    ({"paging": {"store": "nvme"}}, "paging.nvme_path", ["required"]),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, "zero_optimization.offload_optimizer.nvme_path",
     ["required"]),
    ({"paging": {"store": "cpu", "nvme_path": "/tmp/x"}}, "paging.nvme_path", ["only used with store 'nvme'"]),
    ({"paging": {"store": "CPU"}}, "paging.store", ["did you mean 'cpu'"]),
    ({"paging": {"page_size_mb": 0}}, "paging.page_size_mb", ["> 0"]),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", ["stage 3", "not supported"]),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", ["0, 1 or 2"]),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "buffer_count": 2}}},
     "zero_optimization.offload_optimizer.buffer_count", [">= 3"]),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled", ["bf16.enabled"]),
    ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "bfloat16", ["bf16"]),
    ({"fp16": 5}, "fp16", ["must be an object", "loss_scale"]),
    ({"paging": {"store": "cpu"}, "zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}},
     "paging.store", ["zero_optimization.offload_optimizer.device", "disagree"]),
    ({"paging": {"prefetch_depth": 3}, "zero_optimization": {"offload_optimizer": {"device": "cpu",
                                                                                   "buffer_count": 4}}},
     "paging.prefetch_depth", ["buffer_count"]),
    ({"paging": {"store": "nvme", "nvme_path": "/a"},
      "zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/b"}}},
     "paging.nvme_path", ["zero_optimization.offload_optimizer.nvme_path"]),
    ({"optimizer": opt("PagedAdamW8bit"), "paging": {"state_dtype": "fp32"}}, "paging.state_dtype",
     ["PagedAdamW8bit", "'PagedAdamW'"]),
    ({"optimizer": opt("AdamW"), "paging": {"store": "cpu", "state_dtype": "int4"}}, "paging.state_dtype",
     ["PagedAdamW8bit", "paging.store"]),
    ({"optimizer": opt("Lion"), "paging": {"state_dtype": "int4"}}, "paging.state_dtype", ["Lion"]),
    ({"optimizer": opt("AdamW", stochastic_rounding=True), "paging": {"master_weights": True}},
     "paging.master_weights", ["stochastic_rounding"]),
]


@pytest.mark.parametrize("config,path,words", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_each_mistake_is_one_error_naming_the_key(config, path, words):
    err = one_error(config)
    assert err.path == path, err.errors
    text = str(err)
    assert path in text
    for word in words:
        assert word in text, text


def test_several_mistakes_are_listed_together():
    with pytest.raises(ConfigError) as info:
        load({"gradient_cliping": 1, "optimizer": opt("AdamW", lr=-1), "paging": {"executor": "gpu"}})
    err = info.value
    assert [p for p, _ in err.errors] == ["gradient_cliping", "optimizer.params.lr", "paging.executor"]
    lines = str(err).splitlines()
    assert len(lines) == 4 and "3 problems" in lines[0]
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and str(again) == str(err)


@pytest.mark.parametrize("root", [[], 3, None, True, "not-a-file.json", b"{}"])
def test_non_object_roots_are_config_errors(root):
    err = one_error(root)
    assert err.path == ""


def test_world_size_must_be_a_positive_int():
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError):
            load_config({}, world_size=bad)


# ---- JSON files ------------------------------------------------------------------------------
def test_bad_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "gradient_clipping": 1.0,,\n}\n')
    err = one_error(path)
    assert str(path) in str(err) and "line 3" in str(err)


def test_missing_file_and_directory(tmp_path):
    assert "not found" in str(one_error(tmp_path / "nope.json")) and "nope.json" in str(one_error(str(tmp_path /
                                                                                                     "nope.json")))
    assert str(tmp_path) in str(one_error(tmp_path))


def test_duplicate_keys_in_a_file_are_errors(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "lr": 1e-4}}}')
    err = one_error(path)
    assert err.path == "optimizer.params.lr" and "more than once" in str(err) and str(path) in str(err)


def test_file_errors_carry_the_file_name(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"gradient_cliping": 1.0}))
    assert str(path) in str(one_error(path))


# ---- comments, aliases, inputs left alone ---------------------------------------------------------
def test_comment_keys_are_ignored_at_any_depth_and_input_is_not_mutated():
    config = {"_comment": "top", "_comment_batch": 1, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"_comment": "x", "type": "pagedadamw", "params": {"_comment_lr": "y", "lr": 1e-3,
                                                                             "torch_adam": False}},
              "zero_optimization": {"stage": 2, "overlap_comm": True,
                                    "offload_optimizer": {"device": "cpu", "nvme_path": "/x", "_comment": None}},
              "bfloat16": {"enabled": True}}
    before = copy.deepcopy(config)
    cfg = load(config)
    assert config == before
    assert cfg.optimizer.type == "PagedAdamW" and cfg.bf16.enabled and cfg.precision == "bf16"


def test_bfloat16_is_an_alias_of_bf16():
    assert load({"bfloat16": {"enabled": True}}).precision == "bf16"
    assert one_error({"bfloat16": {"enabled": "yes"}}).path == "bfloat16.enabled"
    with pytest.warns(ConfigWarning, match="^bfloat16.immediate_grad_update"):
        load_config({"bfloat16": {"enabled": True, "immediate_grad_update": True}})


def test_scheduler_params_build_the_schedules():
    schedulers = pytest.importorskip("offload_engine.schedulers")
    p = torch.nn.Parameter(torch.zeros(4))
    for params in ({"type": "WarmupLR"}, {"type": "WarmupLR", "params": {"warmup_max_lr": [0.01]}},
                   {"type": "warmupdecaylr", "params": {"total_num_steps": 2000, "warmup_type": "linear"}},
                   {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 10}}):
        cfg = load({"scheduler": params})
        optimizer = torch.optim.SGD([p], lr=0.1)
        scheduler = schedulers.build_scheduler(optimizer, cfg.scheduler.type, cfg.scheduler.params.model_dump())
        scheduler.step()


def test_type_names_are_case_insensitive():
    assert load({"optimizer": {"type": "adamw"}}).optimizer.type == "AdamW"
    assert load({"scheduler": {"type": "warmuplr"}}).scheduler.type == "WarmupLR"


def test_null_sections_and_params():
    cfg = load({"optimizer": None, "scheduler": None, "zero_optimization": {"offload_optimizer": None},
                "paging": {"store": None}})
    assert cfg.optimizer is None and cfg.optimizer_spec() is None and cfg.paging_settings().store is None
    assert load({"optimizer": {"type": "AdamW", "params": None}}).optimizer_spec().name == "CPUAdam"


def test_defaults():
    cfg = load({})
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (1, 1, 1)
    assert cfg.precision == "fp32" and cfg.zero_stage == 0 and cfg.gradient_clipping == 0.0
    assert cfg.steps_per_print == 10 and cfg.scheduler is None and cfg.world_size == 1
    assert not cfg.fp16.enabled and cfg.fp16.initial_scale_power == 16 and cfg.fp16.loss_scale == 0
    s = cfg.paging_settings()
    assert (s.store, s.page_size_mb, s.prefetch_depth, s.io_threads, s.executor) == (None, 16, 2, 4, "auto")
    assert s.master_weights and s.pin_memory and s.overlap == "off" and s.speculation_budget_bytes == 1024 * 2 ** 20
    with pytest.raises(ValidationError):
        cfg.gradient_clipping = 2.0  # frozen


# ---- DeepSpeed keys --------------------------------------------------------------------------------
@pytest.mark.parametrize("config,key", [
    ({"wall_clock_breakdown": True}, "wall_clock_breakdown"),
    ({"tensorboard": {"enabled": True, "output_path": "x"}}, "tensorboard"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": True}}, "zero_optimization.overlap_comm"),
    ({"zero_optimization": {"reduce_bucket_size": 5e8}}, "zero_optimization.reduce_bucket_size"),
    ({"zero_optimization": {"sub_group_size": 1000}}, "zero_optimization.sub_group_size"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "fast_init": True}}},
     "zero_optimization.offload_optimizer.fast_init"),
    ({"optimizer": opt("Adam", torch_adam=True)}, "optimizer.params.torch_adam"),
    ({"bf16": {"enabled": True, "immediate_grad_update": True}}, "bf16.immediate_grad_update"),
    # read by DeepSpeed elsewhere than its engine, or the same numbers here
    ({"activation_checkpointing": {"partition_activations": True}}, "activation_checkpointing"),
    ({"cuda_visible_devices": "0,1"}, "cuda_visible_devices"),
    ({"prescale_gradients": True}, "prescale_gradients"),
    ({"gradient_predivide_factor": 2.0}, "gradient_predivide_factor"),
    ({"zero_optimization": {"cpu_offload_use_pin_memory": True}}, "zero_optimization.cpu_offload_use_pin_memory"),
    # ZeRO-3 keys at another stage, which DeepSpeed ignores there
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param"),
    ({"zero_optimization": {"stage": 2, "stage3_max_live_parameters": 1e9}},
     "zero_optimization.stage3_max_live_parameters"),
    ({"zero_optimization": {"stage": 1, "cpu_offload_param": True}}, "zero_optimization.cpu_offload_param"),
    ({"zero_optimization": {"stage": 2, "gather_16bit_weights_on_model_save": True}},
     "zero_optimization.gather_16bit_weights_on_model_save"),
    # deprecated spellings, mapped as DeepSpeed maps them
    ({"zero_optimization": {"cpu_offload": True}}, "zero_optimization.cpu_offload"),
    ({"zero_optimization": {"cpu_offload": False}}, "zero_optimization.cpu_offload"),
    # unsupported features given their DeepSpeed default: accepted, with a warning
    ({"prescale_gradients": False}, "prescale_gradients"),
    ({"amp": {"enabled": False}}, "amp"),
    ({"zero_optimization": {"offload_param": {"device": "none"}}}, "zero_optimization.offload_param"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 1.0}}},
     "zero_optimization.offload_optimizer.ratio"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "nvme_path": "/x"}}},
     "zero_optimization.offload_optimizer.nvme_path"),
])
def test_deepspeed_hints_warn_once_and_load(config, key):
    with pytest.warns(ConfigWarning) as record:
        load_config(config)
    named = [w for w in record if str(w.message).startswith(key)]
    assert len(named) == 1, [str(w.message) for w in record]


@pytest.mark.parametrize("config,path", [
    ({"amp": {"enabled": True}}, "amp"),
    ({"sparse_gradients": True}, "sparse_gradients"),
    ({"zero_optimization": {"zero_quantized_weights": True}}, "zero_optimization.zero_quantized_weights"),
    ({"zero_optimization": {"elastic_checkpoint": True}}, "zero_optimization.elastic_checkpoint"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
     "zero_optimization.offload_optimizer.ratio"),
    ({"bf16": {"enabled": True, "check_grad_overflow": True}}, "bf16.check_grad_overflow"),
    ({"pipeline": {"stages": 2}}, "pipeline"),
])
def test_unsupported_deepspeed_features_fail(config, path):
    err = one_error(config)
    assert err.path == path and "not supported by offload_engine" in str(err)


def test_warnings_only_for_a_config_that_loads():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        with pytest.raises(ConfigError):
            load_config({"wall_clock_breakdown": True, "gradient_cliping": 1.0})


def test_unused_paging_settings_warn():
    with pytest.warns(ConfigWarning, match="paging.page_size_mb has no effect"):
        load_config({"optimizer": opt("AdamW"), "paging": {"page_size_mb": 4}})


# ---- batch sizes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("train,micro,accum,world,expected", [
    (None, None, None, 1, (1, 1, 1)), (None, None, None, 4, (4, 1, 1)),
    (32, None, None, 1, (32, 32, 1)), (32, None, None, 4, (32, 8, 1)), (30, None, None, 4, None),
    (None, 4, None, 1, (4, 4, 1)), (None, 4, None, 4, (16, 4, 1)),
    (None, None, 8, 1, (8, 1, 8)), (None, None, 8, 4, (32, 1, 8)),
    (32, 4, None, 1, (32, 4, 8)), (32, 4, None, 4, (32, 4, 2)), (32, 16, None, 4, None), (30, 4, None, 1, None),
    (32, None, 2, 1, (32, 16, 2)), (32, None, 2, 4, (32, 4, 2)), (32, None, 3, 1, None),
    (None, 4, 2, 1, (8, 4, 2)), (None, 4, 2, 4, (32, 4, 2)),
    (32, 4, 2, 4, (32, 4, 2)), (32, 4, 2, 1, None), (8, 4, 2, 1, (8, 4, 2)),
])
def test_batch_rule(train, micro, accum, world, expected):
    config = {k: v for k, v in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                                ("gradient_accumulation_steps", accum)) if v is not None}
    if expected is None:
        err = one_error(config, world)
        assert err.path == "train_batch_size" and f"world_size ({world})" in str(err)
        return
    cfg = load(config, world)
    got = (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps)
    assert got == expected and cfg.world_size == world
    assert got[0] == got[1] * got[2] * world
    assert resolve_batch(train, micro, accum, world)[0] == expected


# ---- optimizer resolution ---------------------------------------------------------------------------
ADAM_DS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
PAGE = {"store": "cpu", "page_size_mb": 16.0, "prefetch_depth": 2, "io_threads": 4, "executor": "auto"}
OFFLOAD_CPU = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}

RESOLUTION = [
    # (config, class, kwargs without master_weights / pin_memory)
    ({"optimizer": opt("Adam")}, "CPUAdam", {**ADAM_DS, "bias_correction": True, "adamw_mode": True}),
    ({"optimizer": opt("Adam", adam_w_mode=False)}, "CPUAdam", {**ADAM_DS, "bias_correction": True,
                                                                "adamw_mode": False}),
    ({"optimizer": opt("AdamW", lr=2e-4, weight_decay=0.1)}, "CPUAdam",
     {**ADAM_DS, "lr": 2e-4, "weight_decay": 0.1, "bias_correction": True, "adamw_mode": True}),
    ({"optimizer": opt("CPUAdam", adam_w_mode=False, bias_correction=False)}, "CPUAdam",
     {**ADAM_DS, "bias_correction": False, "adamw_mode": False}),
    ({"optimizer": opt("Adam"), **OFFLOAD_CPU}, "PagedAdamW", {**ADAM_DS, **PAGE, "executor": "cpu"}),
    ({"optimizer": opt("Adam", adam_w_mode=False), **OFFLOAD_CPU}, "PagedAdam", {**ADAM_DS, **PAGE,
                                                                                 "executor": "cpu"}),
    ({"optimizer": opt("Adam"), **OFFLOAD_CPU, "paging": {"executor": "auto"}}, "PagedAdamW", {**ADAM_DS, **PAGE}),
    ({"optimizer": opt("AdamW"), "paging": {"store": "cpu", "state_dtype": "int8"}}, "PagedAdamW8bit",
     {**ADAM_DS, **PAGE}),
    ({"optimizer": opt("Adam", adam_w_mode=False), "paging": {"store": "cpu", "state_dtype": "int8"}},
     "PagedAdam8bit", {**ADAM_DS, **PAGE}),
    ({"optimizer": opt("AdamW"), "paging": {"state_dtype": "int8"}}, "AdamW8bit", ADAM_DS),
    ({"optimizer": opt("Adam", adam_w_mode=False), "paging": {"state_dtype": "int4"}}, "Adam4bit", ADAM_DS),
    ({"optimizer": opt("AdamW", block_size=128), "paging": {"state_dtype": "int4"}}, "AdamW4bit",
     {**ADAM_DS, "block_size": 128}),
    ({"optimizer": opt("AdamW"), "paging": {"store": "nvme", "nvme_path": "/tmp/x", "page_size_mb": 0.5,
                                            "prefetch_depth": 3, "io_threads": 2}}, "PagedAdamW",
     {**ADAM_DS, **PAGE, "store": "nvme", "nvme_path": "/tmp/x", "page_size_mb": 0.5, "prefetch_depth": 3,
      "io_threads": 2}),
    ({"optimizer": opt("AdamW"), "zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/n",
                                                                             "buffer_count": 6}}}, "PagedAdamW",
     {**ADAM_DS, **PAGE, "store": "nvme", "nvme_path": "/n", "prefetch_depth": 4, "executor": "cpu"}),
    ({"optimizer": opt("PagedAdamW")}, "PagedAdamW", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                                      "weight_decay": 1e-2, **PAGE}),
    ({"optimizer": opt("PagedAdamW8bit", lr=1e-4, min_8bit_size=0), "paging": {"state_dtype": "int8"}},
     "PagedAdamW8bit", {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "min_8bit_size": 0,
                        **PAGE}),
    ({"optimizer": opt("PagedAdam8bit", maximize=True)}, "PagedAdam8bit",
     {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": True, **PAGE}),
    ({"optimizer": opt("AdamW8bit")}, "AdamW8bit", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                                    "weight_decay": 1e-2}),
    ({"optimizer": opt("Adam8bit"), **OFFLOAD_CPU}, "PagedAdam8bit",
     {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **PAGE, "executor": "cpu"}),
    ({"optimizer": opt("Lion")}, "Lion", {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}),
    ({"optimizer": opt("Lion"), "paging": {"state_dtype": "int8"}}, "Lion8bit",
     {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}),
    ({"optimizer": opt("Lion", stochastic_rounding=True), "paging": {"store": "cpu"}}, "PagedLion",
     {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "stochastic_rounding": True, **PAGE}),
    ({"optimizer": opt("Lion8bit")}, "Lion8bit", {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}),
    ({"optimizer": opt("PagedLion8bit", lr=3e-5)}, "PagedLion8bit",
     {"lr": 3e-5, "betas": (0.9, 0.99), "weight_decay": 0.0, **PAGE}),
]


@pytest.mark.parametrize("config,name,kwargs", RESOLUTION, ids=[f"{r[1]}-{i}" for i, r in enumerate(RESOLUTION)])
def test_optimizer_resolution(config, name, kwargs):
    spec = load(config).optimizer_spec()
    assert spec.name == name
    assert {k: v for k, v in spec.kwargs.items() if k not in ENGINE_KEYS} == kwargs
    assert accepted_keywords(getattr(optim, name)) >= set(spec.kwargs)


def test_master_weights_keyword():
    cfg = load({"optimizer": opt("AdamW"), "bf16": {"enabled": True}})
    takes_it = "master_weights" in accepted_keywords(optim.CPUAdam)
    assert ("master_weights" in cfg.optimizer_spec().kwargs) == takes_it
    if takes_it:
        assert cfg.optimizer_spec(param_dtype_is_fp32=False).kwargs["master_weights"] is True
        assert cfg.optimizer_spec(param_dtype_is_fp32=True).kwargs["master_weights"] is False
        off = load({"optimizer": opt("AdamW"), "paging": {"master_weights": False}})
        assert off.optimizer_spec(param_dtype_is_fp32=False).kwargs["master_weights"] is False
        rounding = load({"optimizer": opt("AdamW", stochastic_rounding=True)})
        assert rounding.optimizer_spec(param_dtype_is_fp32=False).kwargs["master_weights"] is False
        assert rounding.paging_settings().master_weights is False


def test_every_resolvable_combination_builds():
    """Each type x store x state_dtype that loads gives kwargs its class really accepts."""
    p = torch.nn.Parameter(torch.randn(64))
    built = 0
    for type_name in OPTIMIZER_KINDS:
        for paging in ({}, {"store": "cpu"}):
            for dtype in (None, "fp32", "int8", "int4"):
                config = {"optimizer": {"type": type_name}, "paging": {**paging, **({"state_dtype": dtype}
                                                                                     if dtype else {})}}
                try:
                    cfg = load(config)
                except ConfigError as err:
                    assert len(err.errors) == 1 and err.path in ("paging.state_dtype", "optimizer.type")
                    continue
                spec = cfg.optimizer_spec(param_dtype_is_fp32=False)
                spec.build([p])
                built += 1
    assert built >= 40


def test_params_models_match_the_constructors():
    """Class-named types accept only their constructor's keywords, with its defaults."""
    for name, kind in OPTIMIZER_KINDS.items():
        if kind.deepspeed:
            continue
        cls = getattr(optim, name)
        fields = PARAMS_MODELS[name].model_fields
        # a type whose state format follows paging.state_dtype also takes the quantized classes' keys
        extra = {"adam_w_mode"} | ({"block_size", "min_8bit_size"} if kind.state_dtype is None else set())
        assert set(fields) - extra <= accepted_keywords(cls), name
        signature = {}
        for klass in reversed(cls.__mro__):  # the most derived default wins
            init = klass.__dict__.get("__init__")
            if init is not None:
                signature.update({k: v.default for k, v in inspect.signature(init).parameters.items()
                                  if v.default is not inspect.Parameter.empty})
        for key, field in fields.items():
            if key in signature:
                assert field.default == signature[key], (name, key)
    assert tuple(codec.BLOCK_SIZES) == BLOCK_SIZES


def test_paging_settings_merge():
    s = load({"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/d", "buffer_count": 5,
                                                          "pin_memory": False}}}).paging_settings()
    assert (s.store, s.nvme_path, s.prefetch_depth, s.pin_memory, s.executor) == ("nvme", "/d", 3, False, "cpu")
    same = load({"paging": {"store": "cpu", "prefetch_depth": 2, "executor": "cuda"},
                 "zero_optimization": {"offload_optimizer": {"device": "cpu", "buffer_count": 4}}}).paging_settings()
    assert (same.store, same.prefetch_depth, same.executor) == ("cpu", 2, "cuda")
    assert load({"zero_optimization": {"offload_optimizer": {"device": "none"}}}).paging_settings().store is None


# ---- the schema itself ----------------------------------------------------------------------------
def _models(model, seen):
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        sub = submodel(field.annotation)
        for m in (sub.values() if isinstance(sub, dict) else [sub] if sub else []):
            _models(m, seen)


def test_every_key_has_a_description():
    seen: set = set()
    _models(EngineConfig, seen)
    assert len(seen) > 20
    for model in seen:
        assert issubclass(model, BaseModel) and model.model_config.get("extra") == "forbid"
        for key, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{key}"


def test_docs_are_up_to_date():
    path = ROOT / "docs" / "config.md"
    assert path.read_text() == render(), "docs/config.md is stale: python -m offload_engine.config.docs > " \
                                         "docs/config.md"


# ---- arbitrary JSON ---------------------------------------------------------------------------------
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=8) | st.sampled_from(["cpu", "nvme", "int8", "AdamW", "auto", "none", "log"]))
_KEYS = st.text(max_size=10) | st.sampled_from(
    ["type", "params", "lr", "betas", "enabled", "stage", "offload_optimizer", "device", "nvme_path", "store",
     "state_dtype", "buffer_count", "_comment", "overlap_comm", "loss_scale", "total_num_steps", "adam_w_mode",
     "train_batch_size", "bf16", "fp16", "paging", "optimizer", "scheduler", "zero_optimization", "offload_param"])
JSON = st.recursive(_SCALARS, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(_KEYS, children, max_size=5), max_leaves=20)
SECTIONS = ["optimizer", "scheduler", "paging", "fp16", "bf16", "bfloat16", "zero_optimization",
            "train_batch_size", "gradient_clipping", "activation_checkpointing"]


def _only_config_errors(config, world_size=1):
    try:
        cfg = load(config, world_size)
    except ConfigError as err:
        assert err.errors and all(isinstance(p, str) and isinstance(m, str) and m for p, m in err.errors)
        return
    assert isinstance(cfg, EngineConfig)
    if cfg.optimizer is not None:
        assert hasattr(optim, cfg.optimizer_spec().name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_any_json_gives_a_config_or_a_config_error(value):
    _only_config_errors(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(SECTIONS), JSON, max_size=3), st.integers(1, 8))
def test_any_json_under_real_keys_gives_a_config_or_a_config_error(config, world_size):
    _only_config_errors(config, world_size)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(OPTIMIZER_KINDS) + ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]),
       st.dictionaries(st.sampled_from(["lr", "betas", "eps", "weight_decay", "adam_w_mode", "block_size",
                                        "warmup_min_lr", "warmup_max_lr", "total_num_steps", "warmup_type",
                                        "stochastic_rounding", "min_8bit_size"]), JSON, max_size=3),
       st.dictionaries(st.sampled_from(["store", "state_dtype", "nvme_path", "executor", "master_weights"]),
                       JSON, max_size=2))
def test_any_params_give_a_config_or_a_config_error(type_name, params, paging):
    section = "scheduler" if type_name.startswith("Warmup") else "optimizer"
    _only_config_errors({section: {"type": type_name, "params": params}, "paging": paging})
