"""DeepSpeed configs as users have them (tests/fixtures/ds_configs, each naming its source in
its _comment): they load, each key DeepSpeed ignores is named once in a warning, and what they
mean is what the engine does. Then the rule's single cases: deprecated spellings mapped as
DeepSpeed maps them, fp16.auto_cast, last_batch_iteration and a warmup of 0."""
import json
import warnings
from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.config import ConfigError, ConfigWarning, load_config
from offload_engine.schedulers import WarmupLR

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "ds_configs").glob("*.json"))


def _load(config):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", ConfigWarning)
        cfg = load_config(config)
    return cfg, [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]


def _paths(value, prefix=""):
    """Every key path of a JSON object, dotted."""
    out = []
    for key, item in value.items():
        path = f"{prefix}.{key}" if prefix else key
        out.append(path)
        if isinstance(item, dict):
            out += _paths(item, path)
    return out


# Per fixture: what it means, as the engine must read it.
_MEANS = {
    "deepspeed_chat_stage2_offload": dict(stage=2, precision="fp16", store="cpu", clipping=1.0, micro=8),
    "cifar10_stage2": dict(stage=2, precision="fp16", store=None, clipping=1.0, micro=None),
    "zero_offload_cpu_offload": dict(stage=2, precision="fp16", store="cpu", clipping=0.0, micro=None),
    "warmuplr_activation_checkpointing": dict(stage=2, precision="fp16", store="cpu", clipping=0.0, micro=8),
    "trainer_defaults_filled": dict(stage=2, precision="fp16", store="cpu", clipping=1.0, micro=8),
}


def test_every_fixture_is_checked():
    assert sorted(p.stem for p in FIXTURES) == sorted(_MEANS)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_a_real_config_loads_with_each_ignored_key_named_once(path):
    raw = json.loads(path.read_text())
    cfg, notes = _load(str(path))
    means = _MEANS[path.stem]
    assert cfg.zero_stage == means["stage"] and cfg.precision == means["precision"]
    assert cfg.paging_settings().store == means["store"]
    assert cfg.gradient_clipping == means["clipping"]
    if means["micro"] is not None:
        assert cfg.train_micro_batch_size_per_gpu == means["micro"]
    keys = [p for p in _paths(raw) if not p.split(".")[-1].startswith("_comment")]
    for note in notes:
        named = [k for k in keys if note.startswith(k + " ")]
        assert len(named) == 1, note  # each warning opens with the one key it is about
    named = [next(k for k in keys if n.startswith(k + " ")) for n in notes]
    assert len(named) == len(set(named))  # once each


def test_the_stage3_keys_deepspeed_chat_carries_are_named_as_stage3_only():
    _, notes = _load(str(FIXTURES[[p.stem for p in FIXTURES].index("deepspeed_chat_stage2_offload")]))
    stage3 = [n for n in notes if "applies at ZeRO stage 3 only" in n]
    assert sorted(n.split(" ")[0] for n in stage3) == [
        "zero_optimization.offload_param", "zero_optimization.stage3_max_live_parameters",
        "zero_optimization.stage3_param_persistence_threshold", "zero_optimization.stage3_prefetch_bucket_size"]
    assert all("ignores it at stage 2" in n for n in stage3)


def test_deprecated_cpu_offload_is_offload_optimizer_cpu_as_deepspeed_maps_it():
    new, _ = _load({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    old, notes = _load({"zero_optimization": {"stage": 2, "cpu_offload": True}})
    assert old.paging_settings() == new.paging_settings() and old.paging_settings().store == "cpu"
    assert any(n.startswith("zero_optimization.cpu_offload = true is deprecated") for n in notes)
    off, _ = _load({"zero_optimization": {"stage": 2, "cpu_offload": False}})
    assert off.paging_settings().store is None


def test_cpu_offload_beside_offload_optimizer_is_an_error_as_in_deepspeed():
    with pytest.raises(ConfigError, match="zero_optimization.cpu_offload.*deprecated spelling of offload_optimizer"):
        load_config({"zero_optimization": {"cpu_offload": True, "offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ConfigError, match="zero_optimization.cpu_offload: must be true or false"):
        load_config({"zero_optimization": {"cpu_offload": "yes"}})


class _Recorder(torch.nn.Module):
    """Records the dtypes its inputs arrive in."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen = []

    def forward(self, x, extra=None, ids=None):
        self.seen.append((x.dtype, extra["scale"].dtype, ids.dtype))
        return self.lin(x.to(self.lin.weight.dtype))


@pytest.mark.parametrize("auto_cast", [True, False])
def test_fp16_auto_cast_casts_float_inputs_and_leaves_the_rest(auto_cast):
    model = _Recorder()
    engine, *_ = offload_engine.initialize(model, {
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "fp16": {"enabled": True, "auto_cast": auto_cast}})
    engine(torch.randn(2, 4), extra={"scale": torch.ones(1)}, ids=torch.arange(3))
    want = torch.float16 if auto_cast else torch.float32
    assert model.seen == [(want, want, torch.int64)]


def test_last_batch_iteration_resumes_the_schedule_as_deepspeed_does():
    def engine_lrs(last):
        model = torch.nn.Linear(4, 4)
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 10, "warmup_type": "linear"}
        if last is not None:
            params["last_batch_iteration"] = last
        _, opt, _, sched = offload_engine.initialize(model, {
            "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "scheduler": {"type": "WarmupLR", "params": params}})
        return sched.last_batch_iteration, sched.get_lr()

    assert engine_lrs(None) == engine_lrs(-1)
    last, lrs = engine_lrs(5)
    ref = WarmupLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), warmup_min_lr=0.0,
                   warmup_max_lr=1e-2, warmup_num_steps=10, warmup_type="linear", last_batch_iteration=5)
    assert last == 5 and lrs == ref.get_lr() and lrs != engine_lrs(-1)[1]
    with pytest.raises(ConfigError, match="scheduler.params.last_batch_iteration"):
        load_config({"scheduler": {"type": "WarmupLR", "params": {"last_batch_iteration": -2}}})


def test_a_warmup_of_0_is_a_warmup_of_2_with_a_warning():
    def lrs(warmup):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=warmup)
        out = []
        for _ in range(4):
            out.append(sched.get_lr())
            sched.step()
        return out

    assert lrs(0) == lrs(2) and lrs(0) != lrs(3)
    _, notes = _load({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}})
    assert [n for n in notes if n.startswith("scheduler.params.warmup_num_steps = 0")]


# ---- "auto" without the Trainer --------------------------------------------------------------------
HF_ZERO2 = Path(__file__).parent / "fixtures" / "hf_ds_config_zero2.json"


def test_auto_without_the_trainer_is_refused_naming_what_is_missing():
    with pytest.raises(ConfigError) as err:
        load_config(str(HF_ZERO2))
    paths = sorted(p for p, _ in err.value.errors)
    assert paths == ["gradient_clipping", "scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps"]
    assert "max_grad_norm" in str(err.value) and "run's length" in str(err.value)


def test_auto_without_the_trainer_is_filled_from_what_the_engine_knows():
    raw = json.loads(HF_ZERO2.read_text())
    raw["gradient_clipping"] = 1.0
    raw["optimizer"]["params"]["lr"] = 3e-3
    raw["scheduler"]["params"].update(warmup_num_steps=2, total_num_steps=20)
    model = torch.nn.Linear(8, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", ConfigWarning)
        engine, opt, _, sched = offload_engine.initialize(model, raw)
    notes = [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]
    # the type's defaults: the same config with the "auto" keys left out
    plain = {**raw, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}}
    _, reference, _, _ = offload_engine.initialize(torch.nn.Linear(8, 8), plain)
    group, default = opt.param_groups[0], reference.param_groups[0]
    reference.close()
    assert type(opt) is type(reference)
    assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in default.items() if k != "params"}
    assert sched.max_lrs == [3e-3] and sched.min_lrs == [0.0]  # warmup_max_lr: the optimizer's lr
    assert engine.train_batch_size == 1 and engine.gradient_accumulation_steps == 1
    for key in ("optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
                "scheduler.params.warmup_max_lr", "scheduler.params.warmup_min_lr", "fp16.enabled",
                "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert [n for n in notes if n.startswith(f"{key} = \"auto\"")], key
    opt.close()
