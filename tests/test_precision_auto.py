"""bf16.enabled "auto": bf16 where the params' device computes it fast, fp32 elsewhere
(engine/precision.py), decided by initialize() and honoured through the engine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.config import ConfigError, load_config
from offload_engine.engine import precision
from multirank import launch_ranks

JOB = Path(__file__).with_name("precision_agree_job.py")

CONFIG = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


@pytest.fixture
def slowdown(monkeypatch):
    """Sets what the CPU measurement returns."""
    def set_to(ratio: float):
        monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: ratio)
    return set_to


@pytest.mark.parametrize("ratio, chosen", [(0.23, True), (1.0, True), (1.33, False), (4.8, False)])
def test_a_cpu_gets_bf16_only_where_its_bf16_matmul_is_no_slower(slowdown, ratio, chosen):
    slowdown(ratio)
    use, why = precision.choose_bf16(torch.device("cpu"))
    assert use is chosen and f"{ratio:.2f}x" in why and ("bf16 would be slower" in why) != chosen


@pytest.mark.parametrize("ratio, dtype", [(0.5, torch.bfloat16), (4.8, torch.float32)])
def test_initialize_decides_auto_for_the_params_device(slowdown, ratio, dtype):
    slowdown(ratio)
    model = torch.nn.Linear(8, 4)
    engine, *_ = offload_engine.initialize(model, {**CONFIG, "bf16": {"enabled": "auto"}})
    assert engine.precision == ("bf16" if dtype == torch.bfloat16 else "fp32")
    assert model.weight.dtype == dtype
    loss = engine(torch.randn(2, 8, dtype=dtype)).float().square().mean()
    engine.backward(loss)
    engine.step()
    assert engine.global_steps == 1


def test_an_explicit_bf16_is_honoured_whatever_the_measurement(slowdown):
    slowdown(40.0)
    engine, *_ = offload_engine.initialize(torch.nn.Linear(8, 4), {**CONFIG, "bf16": {"enabled": True}})
    assert engine.precision == "bf16"


def test_auto_is_refused_beside_fp16_and_unresolved_precision_is_not_guessed():
    with pytest.raises(ConfigError, match="bf16.enabled"):
        load_config({**CONFIG, "fp16": {"enabled": True}, "bf16": {"enabled": "auto"}})
    cfg = load_config({**CONFIG, "bf16": {"enabled": "auto"}})
    with pytest.raises(ValueError, match="auto"):
        cfg.precision
    assert cfg.with_bf16(False).precision == "fp32" and cfg.with_bf16(True).precision == "bf16"


def test_the_measurement_runs_once_per_process():
    threads = torch.get_num_threads()
    precision.cpu_bf16_slowdown.cache_clear()
    ratio = precision.cpu_bf16_slowdown()
    assert precision.cpu_bf16_slowdown() == ratio and 0 < ratio < float("inf")
    assert torch.get_num_threads() == threads  # the one-thread measurement puts the thread count back
    use, why = precision.choose_bf16(torch.device("cpu"))
    assert use == (ratio <= precision.SLOWDOWN_LIMIT) and f"{ratio:.2f}x" in why


@pytest.mark.parametrize("slow_ranks, expected", [("", "bf16"), ("1", "fp32"), ("0,1", "fp32")])
def test_data_parallel_ranks_agree_on_auto(tmp_path, slow_ranks, expected):
    """bf16 only where every rank's device runs it fast: ranks in different precisions would not
    train one model."""
    ranks = launch_ranks(JOB, 2, tmp_path / "agree", "--slow-ranks", slow_ranks)
    assert [r["precision"] for r in ranks] == [expected, expected]
    assert {r["dtype"] for r in ranks} == {"torch.bfloat16" if expected == "bf16" else "torch.float32"}
