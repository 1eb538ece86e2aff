"""offload-train end to end: the CLI in a subprocess on the tiny model, its files, --resume
(bit-identical continuation), Ctrl-C, --compare, each bad input, and the default run's loss."""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from offload_engine.config import load_config
from offload_engine.engine.precision import choose_bf16
from offload_engine.optim import PagedAdamW8bit
from offload_engine.train import job
from offload_engine.train.data import BatchSampler, Corpus, CorpusError, load_corpus
from offload_engine.train.models import SIZES, ModelChoiceError, build_model
from offload_engine.train.report import plain_adamw_bytes, state_bytes_by_tier
from tolerances import MIXED_PRECISION

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--no-progress"]
# What the default config's bf16 "auto" picks on this machine (measured; engine/precision.py).
AUTO_PRECISION = "bf16" if choose_bf16(torch.device("cpu"))[0] else "fp32"


def cli(*args, timeout=300, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "offload_engine.train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO, **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / job.METRICS_FILE).read_text().splitlines()]


def test_end_to_end_writes_its_files(tmp_path):
    out = tmp_path / "run"
    r = cli(*TINY, "--steps", 6, "--out", out)
    assert r.returncode == 0, r.stderr
    records = metrics(out)
    assert [m["step"] for m in records] == list(range(1, 7))
    for m in records:
        assert m["loss"] > 0 and m["tokens_per_s"] > 0 and m["step_s"] >= m["optimizer_s"] > 0
        assert m["state_bytes"]["host"] > 0 and m["state_bytes"]["gpu"] == 0 and m["state_bytes"]["nvme"] == 0
    summary = json.loads((out / job.SUMMARY_FILE).read_text())
    assert summary["optimizer"] == "PagedAdamW8bit" and summary["precision"] == AUTO_PRECISION
    assert f"{AUTO_PRECISION} (bf16 auto: a bf16 matmul takes" in r.stdout  # the header says which and why
    assert summary["loss_start"] == records[0]["loss"]
    assert summary["loss_end"] == pytest.approx(statistics.median(m["loss"] for m in records))
    assert summary["steps_done"] == 6 and summary["last_step"] == 6
    # The state held is what the optimizer's pages hold, and plain AdamW's is 12 bytes per param.
    n = summary["trainable"]
    assert summary["plain_adamw_bytes"] == 12 * n
    assert (out / job.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / job.CHECKPOINTS / "latest").read_text().strip() == "global_step6"
    run = json.loads((out / job.RUN_FILE).read_text())
    assert run["model"] == "tiny" and run["steps"] == 6
    # The saved config is the one used: the schedule follows --steps.
    sched = json.loads((out / job.CONFIG_FILE).read_text())["scheduler"]["params"]
    assert sched["total_num_steps"] == 6 and sched["warmup_num_steps"] == 1
    for row in ("loss", "throughput", "optimizer state", "torch AdamW", "peak memory", "time split", "paging"):
        assert row in r.stdout
    assert "Traceback" not in r.stderr


def test_resume_continues_bit_for_bit(tmp_path):
    """A run resumed from its step-4 checkpoint logs steps 5..8 exactly as the run that never
    stopped: same losses, grad norms and lrs (the checkpoint, RNG and batch sampler restored)."""
    straight = tmp_path / "straight"
    assert cli(*TINY, "--steps", 8, "--save-every", 4, "--out", straight).returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / job.CHECKPOINTS / "latest").write_text("global_step4")
    r = cli("--no-progress", "--resume", "--out", resumed)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "at step 4" in r.stdout
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 9))  # steps 5..8 of the first run were dropped, then redone
    for x, y in zip(a, b):
        assert (x["step"], x["loss"], x["grad_norm"], x["lr"]) == (y["step"], y["loss"], y["grad_norm"], y["lr"])
    # And a larger --steps trains on from where it is.
    r = cli("--no-progress", "--resume", "--steps", 10, "--out", resumed)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in metrics(resumed)] == list(range(1, 11))


def test_ctrl_c_saves_a_checkpoint_then_resume_loses_nothing(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "offload_engine.train", *TINY, "--steps", "100000",
                             "--save-every", "0", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / job.METRICS_FILE).is_file() and len((out / job.METRICS_FILE).read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the run logged no steps within 120 s")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "--resume" in lines[0], stderr
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert step >= 3
    assert (out / job.CHECKPOINTS / "latest").read_text().strip() == f"global_step{step}"
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 1))
    r = cli("--no-progress", "--resume", "--steps", step + 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 3))


def test_compare_prints_both_legs(tmp_path):
    r = cli(*TINY, "--compare", "--steps", 3, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("offload-train --compare: the same job"):]
    assert "torch AdamW" in table and "offload_engine" in table and "PagedAdamW8bit" in table
    base = json.loads((tmp_path / "torch_adamw" / job.SUMMARY_FILE).read_text())
    ours = json.loads((tmp_path / "offload_engine" / job.SUMMARY_FILE).read_text())
    assert base["optimizer"] == "AdamW" and base["precision"] == "fp32"
    assert ours["optimizer"] == "PagedAdamW8bit" and ours["precision"] == AUTO_PRECISION
    # torch's AdamW state: fp32 m and v, 8 bytes per param, all in host memory on a CPU run.
    assert base["state_bytes"] == {"gpu": 0, "host": 8 * base["trainable"], "nvme": 0}
    # Same init and batches: the first loss is the same model on the same batch (fp32 vs bf16).
    assert ours["loss_start"] == pytest.approx(base["loss_start"], rel=MIXED_PRECISION[torch.bfloat16]["first_loss_rel"])


@pytest.mark.parametrize("args, message", [
    (["--model", "gigantic"], "unknown --model 'gigantic'"),
    (["--config", "no/such/config.json"], "--config 'no/such/config.json': no such file"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--steps", "abc"], "argument --steps: must be a whole number >= 1, got 'abc'"),
    (["--device", "tpu"], "--device 'tpu' is not a device: use cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta': offload-train runs on cpu, cuda or cuda:N"),
])
def test_bad_arguments_get_one_line(tmp_path, args, message):
    r = cli(*TINY, "--out", tmp_path / "run", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1


def test_short_corpus_unwritable_out_and_bad_config(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = cli(*TINY, "--corpus", short, "--out", tmp_path / "a")
    assert r.returncode == 2 and "fewer than the context length + 1 (33)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    blocker = tmp_path / "file"
    blocker.write_text("")
    r = cli(*TINY, "--out", blocker / "run")
    assert r.returncode == 2 and f"--out '{blocker / 'run'}' cannot be written" in r.stderr, r.stderr

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 4, "optimizer": {"type": "PagedAdamW8bit",
                                                                    "params": {"lrr": 1e-3}}}))
    r = cli(*TINY, "--config", bad, "--out", tmp_path / "b")
    assert r.returncode == 2 and "optimizer.params.lrr" in r.stderr and "did you mean 'lr'" in r.stderr

    r = cli(*TINY, "--out", tmp_path / "empty", "--resume")
    assert r.returncode == 2 and "holds no run to continue" in r.stderr

    r = cli(*TINY, "--out", tmp_path / "c", "--model", "gigantic", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ModelChoiceError" in r.stderr


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", 2, "--out", out).returncode == 0
    before = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    r = cli("--no-progress", "--resume", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "already reached step 2 (--steps 2): nothing to do" in r.stdout and "loss" in r.stdout
    after = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_a_refused_run_leaves_no_out_directory(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 4, "optimizer": {"type": "PagedAdamW8bit",
                                                                    "params": {"lrr": 1e-3}}}))
    r = cli(*TINY, "--config", bad, "--out", tmp_path / "runs" / "a")
    assert r.returncode == 2 and "optimizer.params.lrr" in r.stderr
    assert not (tmp_path / "runs").exists()  # neither --out nor the parent it created
    r = cli(*TINY, "--device", "tpu", "--out", tmp_path / "b")
    assert r.returncode == 2 and not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_anything_is_built(tmp_path):
    r = cli(*TINY, "--device", "cuda", "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "run").exists()
    why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    assert f"--device 'cuda': {why}; use --device cpu" in r.stderr


def test_out_where_no_directory_can_be_made_names_the_parent(tmp_path):
    r = cli(*TINY, "--out", "/proc/forbidden")
    assert r.returncode == 2 and "'/proc' does not accept a new directory" in r.stderr, r.stderr


def test_config_warnings_are_one_line_each_naming_the_key(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train_batch_size": 4, "wall_clock_breakdown": False,
                                  "zero_optimization": {"stage": 0, "overlap_comm": True},
                                  "optimizer": {"type": "PagedAdamW8bit", "params": {"lr": 1e-3}}}))
    r = cli(*TINY, "--config", config, "--steps", 1, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "warning" in line.lower()]
    assert [w.split(" has no effect")[0] for w in warned] == [
        "offload-train: warning: wall_clock_breakdown", "offload-train: warning: zero_optimization.overlap_comm"]
    assert "warnings.warn" not in r.stderr and "ConfigWarning" not in r.stderr
    # The DeepSpeed-style example, nine ignored keys: nine lines, each naming its key, nothing else.
    r = cli(*TINY, "--config", REPO / "configs" / "deepspeed_compat.json", "--steps", 1, "--out", tmp_path / "ds")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(REPO / "configs" / "deepspeed_compat.json")
    assert lines == [f"offload-train: warning: {w.message}" for w in caught] and len(lines) >= 5, lines


def test_resume_refuses_another_model(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", 2, "--out", out).returncode == 0
    r = cli("--no-progress", "--resume", "--model", "small", "--out", out)
    assert r.returncode == 2 and "--model 'small' differs from the run" in r.stderr


def test_hugging_face_config_trains(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                         bos_token_id=0, eos_token_id=0)
    config.save_pretrained(tmp_path / "gpt2-tiny")
    out = tmp_path / "run"
    r = cli("--no-progress", "--model", tmp_path / "gpt2-tiny", "--context", 32, "--steps", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "freshly initialized GPT2LMHeadModel" in r.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


# ---- the pieces, in process ----------------------------------------------------------------------
def test_fit_schedule_rescales_total_and_warmup():
    config = {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 300, "warmup_num_steps": 30}}}
    assert "300 -> 50" in job.fit_schedule(config, 50)
    assert config["scheduler"]["params"] == {"total_num_steps": 50, "warmup_num_steps": 5}
    assert job.fit_schedule(config, 50) is None  # already there
    flat = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 30}}}
    assert job.fit_schedule(flat, 50) is None and flat["scheduler"]["params"] == {"warmup_num_steps": 30}


def test_state_bytes_by_tier_counts_what_each_optimizer_holds():
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(300))]
    for p in params:
        p.grad = torch.randn_like(p)
    torch_opt = torch.optim.AdamW(params)
    torch_opt.step()
    assert state_bytes_by_tier(torch_opt) == {"gpu": 0, "host": 8 * 5300, "nvme": 0}
    paged = PagedAdamW8bit(params, page_size_mb=0.25)
    paged.step()
    stats = paged.paging_stats()
    held = state_bytes_by_tier(paged)
    assert held == {"gpu": 0, "host": stats["store_bytes"] + stats["pool_bytes"], "nvme": 0}
    assert stats["store_bytes"] >= stats["state_bytes"] > 0
    assert plain_adamw_bytes(paged, "fp32") == 8 * 5300 and plain_adamw_bytes(paged, "bf16") == 12 * 5300


def test_read_metrics_drops_steps_after_the_checkpoint_and_a_cut_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in job._read_metrics(path, upto=3)] == [1, 2, 3]
    assert [r["step"] for r in job._read_metrics(path, upto=9)] == [1, 2, 3, 4, 5]


def test_sampler_windows_and_state():
    corpus = Corpus("c", torch.arange(100))
    sampler = BatchSampler(corpus, batch=4, context=10, seed=1)
    state = sampler.state_dict()
    x, y = sampler.next("cpu")
    assert x.shape == y.shape == (4, 10) and torch.equal(y, x + 1)  # targets are the inputs shifted by one
    sampler.load_state_dict(state)
    x2, _ = sampler.next("cpu")
    assert torch.equal(x, x2)
    with pytest.raises(CorpusError, match="fewer than the context length"):
        BatchSampler(Corpus("c", torch.arange(10)), batch=1, context=10, seed=0)
    assert len(load_corpus(None)) > 20_000


def test_models():
    with pytest.raises(ModelChoiceError, match="built-in sizes are tiny, small"):
        build_model("nope")
    loaded = build_model("tiny")
    assert loaded.context == SIZES["tiny"].context and loaded.module.head.weight is loaded.module.tok.weight
    out = loaded.module(torch.randint(0, 256, (2, 7)))
    assert out.shape == (2, 7, 256)


def test_configs_default_is_the_embedded_one():
    embedded = (REPO / "offload_engine" / "train" / "data" / "default.json").read_bytes()
    assert (REPO / "configs" / "default.json").read_bytes() == embedded
    assert json.loads(embedded)["optimizer"]["type"] == "PagedAdamW8bit"


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The README's main job, as shipped: the loss ends well below where it starts."""
    r = cli("--no-progress", "--out", tmp_path / "run", timeout=900)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / job.SUMMARY_FILE).read_text())
    assert summary["last_step"] == job.DEFAULT_STEPS and summary["optimizer"] == "PagedAdamW8bit"
    assert summary["loss_start"] > 5.0          # ln(256) = 5.55: an untrained byte model
    assert summary["loss_end"] < 0.5 * summary["loss_start"]


def test_hugging_face_directory_with_its_tokenizer(tmp_path):
    """A model directory that brings a tokenizer trains on the tokenizer's ids, not bytes."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([load_corpus(None).tokens.to(torch.uint8).numpy().tobytes().decode()], vocab_size=300,
                            show_progress=False)
    model_dir = tmp_path / "gpt2-bpe"
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(model_dir)
    transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                            eos_token_id=0).save_pretrained(model_dir)
    r = cli("--no-progress", "--model", model_dir, "--context", 32, "--steps", 2, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    bytes_count = len(load_corpus(None))
    token_count = int(r.stdout.split("built-in corpus (")[1].split(" tokens")[0].replace(",", ""))
    assert 0 < token_count < bytes_count  # merged pairs: fewer ids than bytes


def test_the_plots_mean_is_centred_on_each_step():
    """A trailing mean lagged the raw loss by half its window; the centred one does not."""
    from offload_engine.train.plot import centered_mean
    ramp = [float(i) for i in range(40)]
    assert centered_mean(ramp, 9)[4:36] == ramp[4:36]
    spike = [0.0] * 10 + [9.0] + [0.0] * 10
    m = centered_mean(spike, 3)
    # a centred window of 3 spreads the spike over steps 9..11 and nowhere else;
    # a trailing one would put it at 10..12.
    assert m[9:12] == [3.0, 3.0, 3.0] and m[8] == m[12] == 0.0 and m[0] == 0.0


def test_the_plots_legend_says_what_the_hatched_bar_is(tmp_path, monkeypatch):
    from offload_engine.train import plot
    legends = {}

    def keep(fig):  # read the legends before the figure is closed
        legends.update({ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes})

    monkeypatch.setattr(plot.plt, "close", keep)
    history = [{"step": i + 1, "loss": 5.0 - 0.01 * i} for i in range(40)]
    summary = {"optimizer": "PagedAdamW8bit", "precision": "fp32", "device": "cpu",
               "state_bytes": {"gpu": 0, "host": 5 << 20, "nvme": 0}, "plain_adamw_bytes": 9 << 20}
    assert plot.write_plot(tmp_path / "p.png", history, summary).is_file()
    assert legends["PagedAdamW8bit, fp32, cpu"] == ["loss", "mean of 2 steps around each"]
    assert any(t.startswith("torch AdamW would hold") and "not allocated" in t
               for t in legends["optimizer state by tier"])


def test_overlap_exact_reports_its_guesses(tmp_path):
    """paging.overlap "exact" with clipping: the summary says how the guesses went. (At the
    default's clipping of 1.0 the tiny model clips every early step, so no step guesses.)"""
    config = json.loads((REPO / "configs" / "default.json").read_text())
    config["paging"]["overlap"] = "exact"
    config["gradient_clipping"] = 50.0
    path = tmp_path / "exact.json"
    path.write_text(json.dumps(config))
    r = cli(*TINY, "--config", path, "--steps", 6, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    spec = json.loads((tmp_path / "run" / job.SUMMARY_FILE).read_text())["speculation"]
    assert spec["steps"] == 5  # every step but the first, which lays out the pages
    assert spec["kept"] + spec["redo"] + spec["skipped"] + spec["waited"] == 5
    assert spec["kept"] >= 1 and spec["peak_kept_bytes"] > 0
    line = next(line for line in r.stdout.splitlines() if line.startswith("  overlap "))
    assert f" 5 steps: {spec['kept']} kept their pages updated in backward" in line and "hit rate" in line


def test_overlap_delayed_reports_its_delayed_steps(tmp_path):
    """paging.overlap "delayed": the summary counts the delayed steps past the warm-up, and the
    final checkpoint holds every step (the pending one is applied before the save)."""
    config = json.loads((REPO / "configs" / "default.json").read_text())
    config["paging"]["overlap"] = "delayed"
    config["paging"]["delayed_warmup_steps"] = 2
    path = tmp_path / "delayed.json"
    path.write_text(json.dumps(config))
    r = cli(*TINY, "--config", path, "--steps", 6, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / job.SUMMARY_FILE).read_text())
    delayed = summary["delayed"]
    applied = sum(1 for line in (tmp_path / "run" / job.METRICS_FILE).read_text().splitlines()[2:]
                  if json.loads(line)["applied"])
    assert delayed["steps_delayed"] == applied > 0 and delayed["warmup_steps"] == 2
    assert delayed["param_copy_bytes"] > 0
    line = next(line for line in r.stdout.splitlines() if line.startswith("  overlap "))
    assert f"delayed: {delayed['steps_delayed']} steps updated" in line


def test_plan_trains_with_the_planners_choice(tmp_path):
    """--plan: the saved config is the planner's first choice for this model and precision from
    the cached probe (a synthetic one here, so the choice is known), and the log says so."""
    import socket

    from offload_engine.plan import make_plan, save_cache
    from offload_engine.plan.workload import workload
    from test_plan import synthetic
    cache = tmp_path / "cache"
    probe = synthetic(cores=2)
    save_cache(probe, str(cache / f"probe-{socket.gethostname()}.json"))
    base = job.load_config_dict(None)[0]
    job.fit_schedule(base, 3)
    choice = make_plan(workload("tiny", dtype=AUTO_PRECISION), probe, base).choice
    out = tmp_path / "run"
    r = cli(*TINY, "--steps", 3, "--out", out, "--plan", env_extra={"OFFLOAD_ENGINE_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / job.CONFIG_FILE).read_text())
    assert saved == choice.config and saved["paging"]["store"] == "cpu"
    assert f"--plan: {choice.candidate.label()} ({choice.config['optimizer']['type']})" in r.stdout
    summary = json.loads((out / job.SUMMARY_FILE).read_text())
    assert summary["optimizer"] == choice.config["optimizer"]["type"] and "placed by --plan" in summary["config"]
    # a resumed run keeps its saved config; --baseline trains torch AdamW: neither takes --plan
    for extra, message in ((["--resume"], "--plan places a new run's state"),
                           (["--baseline"], "--plan places the engine's optimizer state")):
        r = cli(*TINY, "--out", out, "--plan", *extra, env_extra={"OFFLOAD_ENGINE_CACHE": str(cache)})
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
