"""Engine checkpoints: bit-exact resume in a new process, atomic saves (SIGKILL mid-save), and
refusal of truncated, corrupt or mismatched checkpoints with the engine left untouched."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.engine import CheckpointError
from offload_engine.engine import checkpoint as ckpt

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import engine_job  # noqa: E402

BASE = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 12, "warmup_num_steps": 3}}}
VARIANTS = {
    "fp32-host": {"optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-2}}, "paging": {"page_size_mb": 0.008}},
    "int8-nvme": {"optimizer": {"type": "PagedAdamW8bit", "params": {"lr": 1e-2, "min_8bit_size": 1000}},
                  "paging": {"store": "nvme", "nvme_path": "{nvme}", "page_size_mb": 0.008}},
    "fp32-nvme-bf16": {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "bf16": {"enabled": True},
                       "paging": {"store": "nvme", "nvme_path": "{nvme}", "page_size_mb": 0.008}},
    "int8-unpaged-fp16": {"optimizer": {"type": "AdamW8bit", "params": {"lr": 1e-2, "min_8bit_size": 1000}},
                          "fp16": {"enabled": True, "initial_scale_power": 6, "loss_scale_window": 2}},
}


def _config(name, tmp_path) -> dict:
    text = json.dumps({**BASE, **VARIANTS[name]}).replace("{nvme}", str(tmp_path / "nvme"))
    (tmp_path / "nvme").mkdir(exist_ok=True)
    return json.loads(text)


def _job(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(HERE / "engine_job.py"), *args], check=True, env=env, timeout=300)


def _assert_same_state(a: dict, b: dict):
    assert a["params"].keys() == b["params"].keys()
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys()
        for key, value in sa[name].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[name][key]), (name, key)
            else:
                assert value == sb[name][key], (name, key)
    assert a["lr"] == b["lr"] and a["global_steps"] == b["global_steps"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_in_a_new_process_is_bit_exact(variant, tmp_path):
    """4 steps, save, load in a new process, 5 more == 9 straight: every param, every state
    tensor, the lr and the RNG, bit for bit."""
    config = json.dumps(_config(variant, tmp_path))
    _job("--config", config, "--steps", "4", "--save", str(tmp_path / "ckpt"))
    _job("--config", config, "--steps", "5", "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "resumed.pt"))
    _job("--config", config, "--steps", "9", "--out", str(tmp_path / "straight.pt"))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    _assert_same_state(resumed, straight)
    assert resumed["losses"] == straight["losses"][-len(resumed["losses"]):]
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step4"


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_a_paged_optimizer_stays_paged_after_resume(store, tmp_path):
    paging = {"store": store, "page_size_mb": 0.008, **({"nvme_path": str(tmp_path)} if store == "nvme" else {})}
    config = {**BASE, "optimizer": {"type": "PagedAdamW8bit", "params": {"min_8bit_size": 1000}}, "paging": paging}
    engine, opt, _, _ = offload_engine.initialize(engine_job.make_model(), config)
    engine_job.train(engine, 2)
    engine.save_checkpoint(tmp_path / "ckpt")
    engine2, opt2, _, _ = offload_engine.initialize(engine_job.make_model(), config)
    engine2.load_checkpoint(tmp_path / "ckpt")
    stats = opt2.paging_stats()
    assert stats["store"] == store and stats["num_pages"] > 1 and stats["state_bytes"] > 0
    for p in engine2.module.parameters():  # the moments live in pages, not in opt.state
        assert set(opt2.state[p]) <= {"step", "format", "block_size"}
    rng = torch.get_rng_state()  # the checkpoint's: both engines draw the same dropout masks
    engine_job.train(engine2, 1)
    torch.set_rng_state(rng)
    engine_job.train(engine, 1)
    for p, q in zip(engine.module.parameters(), engine2.module.parameters()):
        assert torch.equal(p, q)
    opt.close()
    opt2.close()


def _engine(tmp_path, steps=2):
    config = {**BASE, "optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-2}}, "paging": {"page_size_mb": 0.008}}
    engine, *_ = offload_engine.initialize(engine_job.make_model(), config)
    engine_job.train(engine, steps)
    return engine


def _fingerprint(engine):
    return ([p.detach().clone() for p in engine.module.parameters()], engine.global_steps, engine.get_lr(),
            copy.deepcopy(engine.checkpointer.optimizer_state_by_name()["state"]))  # state_dict shares live step tensors


def _same_fingerprint(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1:3] == b[1:3]
    for name, state in a[3].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[3][name][key])


def _corrupt_cases():
    def truncate(path):
        data = (path / "optimizer.pt").read_bytes()
        (path / "optimizer.pt").write_bytes(data[: len(data) // 2])
        return "optimizer.pt: .* bytes, the manifest records .* \\(truncated\\?\\)"

    def flip(path):
        data = bytearray((path / "model.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / "model.pt").write_bytes(bytes(data))
        return "model.pt: contents do not match the manifest's SHA-256"

    def version(path):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["version"] = 99
        (path / "manifest.json").write_text(json.dumps(manifest))
        return "manifest.json: checkpoint format version 99 is not supported"

    def missing_file(path):
        (path / "engine.pt").unlink()
        return "engine.pt: missing"

    def missing_manifest(path):
        (path / "manifest.json").unlink()
        return "manifest.json: missing"

    return {"truncated": truncate, "bit flip": flip, "unknown version": version, "missing file": missing_file,
            "missing manifest": missing_manifest}


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_a_corrupt_checkpoint_is_refused_by_file_and_the_previous_one_still_loads(case, tmp_path):
    engine = _engine(tmp_path)
    engine.save_checkpoint(tmp_path, tag="good")
    good = _fingerprint(engine)
    engine_job.train(engine, 2)
    bad_path = engine.save_checkpoint(tmp_path, tag="bad")
    current = _fingerprint(engine)
    pattern = _corrupt_cases()[case](bad_path)
    with pytest.raises(CheckpointError, match=pattern):
        engine.load_checkpoint(tmp_path)  # latest -> bad
    _same_fingerprint(_fingerprint(engine), current)  # nothing changed
    engine.load_checkpoint(tmp_path, tag="good")
    _same_fingerprint(_fingerprint(engine), good)


def _write_bad_part(tmp_path, engine, part, edit):
    """A checkpoint whose files are intact on disk but whose content is wrong."""
    path = engine.save_checkpoint(tmp_path, tag="bad")
    parts = ckpt.read_checkpoint(path, ("model.pt", "optimizer.pt", "engine.pt"), pickled=("engine.pt",))
    edit(parts[part])
    ckpt.write_checkpoint(tmp_path, "bad", parts)


@pytest.mark.parametrize("part, edit, pattern", [
    ("engine.pt", lambda s: s.pop("counters"), "engine.pt: missing key 'counters'"),
    ("engine.pt", lambda s: s.update(version=7), "engine state version 7 is not supported"),
    ("engine.pt", lambda s: s.update(lr_scheduler=None), "holds no scheduler state"),
    ("model.pt", lambda s: s.pop("0.weight"), "model.pt: keys differ .*missing: \\['0.weight'\\]"),
    ("model.pt", lambda s: s.update({"3.bias": torch.zeros(9)}), "model.pt: 3.bias has shape \\[9\\]"),
    ("optimizer.pt", lambda s: s["state"]["3.weight"].update(exp_avg=torch.zeros(2)),
     "optimizer.pt: .*exp_avg.* has shape \\[2\\]"),
    ("optimizer.pt", lambda s: s["param_groups"][0]["params"].pop(), "optimizer.pt: param group 0 does not match"),
    ("optimizer.pt", lambda s: s.update(state_format_version=5), "optimizer.pt: .*state_format_version 5"),
])
def test_a_checkpoint_with_a_missing_key_or_wrong_shape_is_refused_and_nothing_changes(tmp_path, part, edit,
                                                                                        pattern):
    engine = _engine(tmp_path)
    engine.save_checkpoint(tmp_path, tag="good")
    good = _fingerprint(engine)
    engine_job.train(engine, 1)
    current = _fingerprint(engine)
    _write_bad_part(tmp_path, engine, part, edit)
    with pytest.raises(CheckpointError, match=pattern):
        engine.load_checkpoint(tmp_path, tag="bad")
    _same_fingerprint(_fingerprint(engine), current)
    engine.load_checkpoint(tmp_path, tag="good")
    _same_fingerprint(_fingerprint(engine), good)


def test_no_latest_and_bad_tags_are_clear(tmp_path):
    engine = _engine(tmp_path, steps=1)
    with pytest.raises(CheckpointError, match="latest: no such file"):
        engine.load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        engine.load_checkpoint(tmp_path, tag="nope")
    with pytest.raises(ValueError, match="checkpoint tag must be"):
        engine.save_checkpoint(tmp_path, tag="../escape")


def test_client_state_round_trips_and_a_tag_can_be_overwritten(tmp_path):
    engine = _engine(tmp_path, steps=1)
    engine.save_checkpoint(tmp_path, tag="t", client_state={"epoch": 3, "note": "first"})
    engine_job.train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="t", client_state={"epoch": 4})
    path, client = engine.load_checkpoint(tmp_path)
    assert path == tmp_path / "t" and client == {"epoch": 4} and engine.global_steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "t"]


KILL_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {here!r})
    import engine_job, offload_engine
    from offload_engine.engine import checkpoint as ckpt
    config = {config!r}
    engine, *_ = offload_engine.initialize(engine_job.make_model(), config)
    engine_job.train(engine, 2)
    engine.save_checkpoint({save!r}, tag="good")
    engine_job.train(engine, 2)
    real = ckpt._fsync_file
    calls = []
    def stall(f):
        real(f)
        calls.append(f)
        if len(calls) == 2:  # model.pt and optimizer.pt written, engine.pt and the manifest not yet
            open({marker!r}, "w").close()
            time.sleep(600)
    ckpt._fsync_file = stall
    engine.save_checkpoint({save!r}, tag="bad")
""")


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    config = {**BASE, "optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-2}}, "paging": {"page_size_mb": 0.008}}
    save, marker = tmp_path / "ckpt", tmp_path / "mid-save"
    script = KILL_CHILD.format(here=str(HERE), config=config, save=str(save), marker=str(marker))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert child.poll() is None, "the child exited before reaching the middle of the save"
            assert time.time() < deadline, "the child never reached the middle of the save"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert (save / "latest").read_text() == "good" and not (save / "bad").exists()
    assert any(p.name.startswith(".bad.tmp-") for p in save.iterdir())  # the half-written temporary
    engine, *_ = offload_engine.initialize(engine_job.make_model(), config)
    path, _ = engine.load_checkpoint(save)
    assert path.name == "good" and engine.global_steps == 2
    reference, *_ = offload_engine.initialize(engine_job.make_model(), config)
    engine_job.train(reference, 2)
    for p, q in zip(engine.module.parameters(), reference.module.parameters()):
        assert torch.equal(p, q)
    engine.save_checkpoint(save, tag="next")  # the dead process's temporary is cleaned up
    assert not any(p.name.startswith(".bad.tmp-") for p in save.iterdir())


def _full_fingerprint(engine):
    return (_fingerprint(engine), engine.lr_scheduler.state_dict(), engine.micro_steps, engine.skipped_steps,
            [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups])


def _same_full(a, b):
    _same_fingerprint(a[0], b[0])
    assert a[1:] == b[1:]


@pytest.mark.parametrize("part, edit, pattern", [
    ("engine.pt", lambda s: s["rng"].pop("torch"), "engine.pt: missing or bad RNG states"),
    ("engine.pt", lambda s: s.update(lr_scheduler={"nonsense": 1}), "engine.pt: .*last_batch_iteration"),
    ("optimizer.pt", lambda s: s["state"].update({"9.weight": s["state"]["0.weight"]}),
     "optimizer.pt: state for params the optimizer does not hold: \\['9.weight'\\]"),
    ("optimizer.pt", lambda s: s["param_groups"][0].pop("params"), "optimizer.pt: malformed optimizer state"),
])
def test_late_failures_leave_model_optimizer_scheduler_and_counters_untouched(tmp_path, part, edit, pattern):
    engine = _engine(tmp_path)
    engine_job.train(engine, 1)
    _write_bad_part(tmp_path, engine, part, edit)
    engine_job.train(engine, 1)
    current = _full_fingerprint(engine)
    with pytest.raises(CheckpointError, match=pattern):
        engine.load_checkpoint(tmp_path, tag="bad")
    _same_full(_full_fingerprint(engine), current)


def test_a_failed_optimizer_load_restores_the_groups_and_the_model(tmp_path, monkeypatch):
    engine = _engine(tmp_path)
    engine.save_checkpoint(tmp_path, tag="a")
    engine_job.train(engine, 2)
    current = _full_fingerprint(engine)

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(engine.optimizer.pager, "write_states", broken)
    with pytest.raises(CheckpointError, match="optimizer.pt: loading it into the optimizer failed: OSError"):
        engine.load_checkpoint(tmp_path, tag="a")
    _same_full(_full_fingerprint(engine), current)


def test_save_is_refused_after_a_failed_step(tmp_path, monkeypatch):
    engine = _engine(tmp_path)
    engine.save_checkpoint(tmp_path)
    engine.optimizer.mark_failed("a step failed after updating 2 of 6 pages (injected)")
    with pytest.raises(RuntimeError, match="failed state .*nothing is saved"):
        engine.save_checkpoint(tmp_path)
    assert (tmp_path / "latest").read_text() == "global_step2"


def test_overwriting_a_tag_keeps_the_old_copy_when_the_rename_fails_or_the_process_dies(tmp_path, monkeypatch):
    engine = _engine(tmp_path, steps=1)
    engine.save_checkpoint(tmp_path, tag="last")
    first = _fingerprint(engine)
    engine_job.train(engine, 1)
    real_rename = os.rename

    def fail_second(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device (injected)")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", fail_second)
    with pytest.raises(OSError, match="injected"):
        engine.save_checkpoint(tmp_path, tag="last")
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "latest"]
    # A process killed between the two renames: only the old copy exists; a read finds it.
    old = tmp_path / f".last.old-{ckpt._host()}-999999-0123456789ab"
    os.rename(tmp_path / "last", old)
    engine2 = _engine(tmp_path, steps=0)
    path, _ = engine2.load_checkpoint(tmp_path)
    assert path == old
    _same_fingerprint(_fingerprint(engine2), first)
    engine2.save_checkpoint(tmp_path, tag="last")  # the tag is back: the old copy is cleaned up
    engine2.save_checkpoint(tmp_path, tag="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "latest", "other"]
