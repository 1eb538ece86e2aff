"""One `offload-train` run: build the model, the corpus sampler and the engine from the config,
train to --steps, write metrics.jsonl, checkpoints, the plot and summary.json under --out, and
return the summary. A resumed run picks up the checkpoint, the batch sampler and the metrics
where the saved run stopped, so its loss curve continues the same one."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import psutil
import torch
from torch.nn import functional as F

from .. import initialize
from ..config import ConfigError
from ..engine.precision import choose_bf16
from .data import BatchSampler, load_corpus
from .models import build_model, logits
from .report import plain_adamw_bytes, state_bytes_by_tier

RUN_FILE = "run.json"          # what the run is (model, config, corpus, seed): --resume reads it back
CONFIG_FILE = "config.json"    # the config as used, schedule rescaled: a resume needs no other file
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "training.png"
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
DEFAULT_CONFIG = "default"     # --config's name for the embedded configs/default.json
DEFAULT_STEPS = 300
_SCHEDULES_WITH_TOTAL = ("WarmupDecayLR", "WarmupCosineLR")


class JobError(RuntimeError):
    """A setting or file this run cannot use; the message says which and why."""


class NothingToDo(Exception):
    """--resume of a run that already reached --steps: nothing is trained and no file changes."""

    def __init__(self, message: str, out: Path):
        super().__init__(message)
        self.out = out


@dataclasses.dataclass
class JobSettings:
    config: str | None = None        # a JSON path; None: the embedded default
    steps: int | None = None         # optimizer steps to reach (a resumed run: in all)
    model: str | None = None         # a built-in size or a Hugging Face path; None: 'small'
    out: Path = Path("runs/offload-train")
    resume: bool = False
    seed: int | None = None
    corpus: str | None = None
    context: int | None = None
    baseline: bool = False           # torch.optim.AdamW with fp32 params instead of the config's optimizer
    save_every: int = 100
    progress: bool = True
    device: str | None = None        # None: cuda when available, else cpu
    plan: bool = False               # place the state where the planner says (plan/for_job.py)


# ---- the run directory ----------------------------------------------------------------------
def prepare_out(out: Path) -> list[Path]:
    """Creates --out and proves a file can be written there, before any training time is spent.
    Returns the directories it created, outermost first (remove_created takes them back)."""
    missing = [d for d in (out, *out.parents) if not d.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        remove_created(missing)
        raise JobError(f"--out {str(out)!r} cannot be written: {_why_unwritable(out, e)}") from None
    return missing


def _why_unwritable(out: Path, err: OSError) -> str:
    """What stands in the way, named: the nearest part of the path that exists."""
    existing = next((d for d in (out, *out.parents) if d.exists()), None)
    reason = err.strerror or str(err)
    if existing is None:
        return reason
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a directory"
    if existing == out:
        return f"no file can be created in it ({reason})"
    return f"{str(existing)!r} does not accept a new directory ({reason})"


def remove_created(dirs: list[Path]) -> None:
    """Removes the directories prepare_out created, innermost first, where they are still empty:
    a refused run leaves nothing behind."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            return  # not empty (or gone): it and its parents stay


def resolve_device(name: str | None) -> torch.device:
    """--device as a torch.device this machine has, checked before anything is built."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise JobError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise JobError(f"--device {name!r}: offload-train runs on cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise JobError(f"--device {name!r}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise JobError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def load_config_dict(config: str | None) -> tuple[dict, str]:
    """(the config as a dict, where it came from) for --config: a JSON file, or None (or
    "default") for the embedded configs/default.json. Raises JobError naming --config."""
    if config is None or config == DEFAULT_CONFIG:
        text = resources.files(__package__).joinpath("data", "default.json").read_text(encoding="utf-8")
        return json.loads(text), "configs/default.json (embedded)"
    path = Path(config)
    if not path.is_file():
        raise JobError(f"--config {config!r}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"--config {config!r}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise JobError(f"--config {config!r}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def fit_schedule(config: dict, steps: int) -> str | None:
    """Rescales a schedule with an end (WarmupDecayLR, WarmupCosineLR) to `steps`, warmup in
    proportion, so a short run still warms up and decays. Returns a note for the log."""
    sched = config.get("scheduler")
    if not isinstance(sched, dict) or sched.get("type") not in _SCHEDULES_WITH_TOTAL:
        return None
    params = sched.setdefault("params", {})
    total = params.get("total_num_steps")
    if total == steps or not isinstance(total, int) or total < 1:
        return None
    params["total_num_steps"] = steps
    warmup = params.get("warmup_num_steps")
    if isinstance(warmup, int) and warmup >= 1:
        params["warmup_num_steps"] = max(1, min(steps, round(warmup * steps / total)))
    return (f"scheduler.params.total_num_steps {total} -> {steps} to follow --steps"
            + (f", warmup_num_steps {warmup} -> {params['warmup_num_steps']}" if isinstance(warmup, int) else ""))


def _baseline_config(config: dict) -> tuple[dict, dict]:
    """The config for the torch AdamW leg: no optimizer section (torch's AdamW is passed in),
    fp32 params (torch's AdamW keeps no fp32 master), the same batch, clipping and schedule."""
    config = copy.deepcopy(config)
    params = (config.pop("optimizer", None) or {}).get("params", {})
    hyper = {k: params[k] for k in ("lr", "eps", "weight_decay") if k in params}
    if "betas" in params:
        hyper["betas"] = tuple(params["betas"])
    for key in ("bf16", "bfloat16", "fp16"):
        config.pop(key, None)
    config.pop("paging", None)
    return config, hyper


def _resolve(settings: JobSettings, device: torch.device, log=print) -> tuple[JobSettings, dict, str, list[str]]:
    """Fills unset options from the saved run (--resume) or the defaults; returns the settings,
    the config dict to use, its name, and notes for the log."""
    notes = []
    out = settings.out
    if settings.resume:
        run_file = out / RUN_FILE
        if not run_file.is_file() or not (out / CHECKPOINTS / "latest").is_file():
            raise JobError(f"--resume: {str(out)!r} holds no run to continue ({RUN_FILE} and {CHECKPOINTS}/latest "
                           "are written by a run with this --out)")
        saved = json.loads(run_file.read_text(encoding="utf-8"))
        for key in ("model", "corpus", "context", "seed", "config"):
            given = getattr(settings, key)
            if given is not None and given != saved[key]:
                raise JobError(f"--resume: --{key} {given!r} differs from the run in {str(out)!r} "
                               f"({saved[key]!r}); a resumed run keeps its {key}")
        if settings.baseline != saved["baseline"]:
            raise JobError(f"--resume: --baseline differs from the run in {str(out)!r}")
        settings = dataclasses.replace(settings, model=saved["model"], corpus=saved["corpus"],
                                       context=saved["context"], seed=saved["seed"], config=saved["config"],
                                       steps=settings.steps if settings.steps is not None else saved["steps"])
        tag = (out / CHECKPOINTS / "latest").read_text(encoding="utf-8").strip()
        prefix = "global_step"  # the engine's checkpoint tags (save_checkpoint's default)
        at = int(tag[len(prefix):]) if tag.startswith(prefix) and tag[len(prefix):].isdigit() else None
        if at is not None and at >= settings.steps:
            raise NothingToDo(f"the run in {str(out)!r} already reached step {at} (--steps {settings.steps}): nothing "
                              "to do, and its files are left as they are; pass a larger --steps to train on", out)
        config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        return settings, config, saved["config_name"], notes
    settings = dataclasses.replace(settings, model=settings.model or "small",
                                   seed=0 if settings.seed is None else settings.seed,
                                   steps=DEFAULT_STEPS if settings.steps is None else settings.steps)
    config, name = load_config_dict(settings.config)
    note = fit_schedule(config, settings.steps)
    if note:
        notes.append(note)
    if settings.plan:
        from ..plan.for_job import config_dtype, plan_job
        from ..plan.workload import PlanError
        try:
            planned = plan_job(config, settings.model, config_dtype(config, device), settings.context, log=log)
        except (PlanError, ValueError) as err:
            raise JobError(str(err)) from None
        config, name = planned.config, f"{name}, state placed by --plan"
        notes.append(planned.note())
    return settings, config, name, notes


# ---- the run ---------------------------------------------------------------------------------
def run(settings: JobSettings, stop: threading.Event | None = None, log=print) -> dict:
    """Trains and returns the summary (also written to summary.json). `stop`, when set (Ctrl-C),
    ends the run after the optimizer step in progress, with a checkpoint."""
    stop = stop or threading.Event()
    if settings.steps is not None and settings.steps < 1:
        raise JobError(f"--steps must be >= 1, got {settings.steps}")
    if settings.save_every < 0:
        raise JobError(f"--save-every must be >= 0 (0: only at the end), got {settings.save_every}")
    if settings.plan and settings.resume:
        raise JobError("--plan places a new run's state; a resumed run keeps the config it was saved with "
                       "(drop --plan)")
    if settings.plan and settings.baseline:
        raise JobError("--plan places the engine's optimizer state; --baseline trains torch AdamW instead "
                       "(drop one of them)")
    device = resolve_device(settings.device)
    created = prepare_out(settings.out)
    try:
        return _run(settings, device, stop, log)
    except BaseException:
        remove_created(created)  # only what is still empty: a run that wrote files keeps them
        raise


def _run(settings: JobSettings, device: torch.device, stop: threading.Event, log) -> dict:
    settings, config, config_name, notes = _resolve(settings, device, log)
    out = settings.out

    torch.manual_seed(settings.seed)
    loaded = build_model(settings.model, settings.context)
    corpus = load_corpus(settings.corpus, loaded.tokenizer)
    model = loaded.module.to(device)
    optimizer_arg = None
    engine_config = config
    if settings.baseline:
        engine_config, hyper = _baseline_config(config)
        optimizer_arg = lambda params: torch.optim.AdamW(params, **hyper)  # noqa: E731
    try:
        engine, optimizer, _, _ = initialize(model, engine_config, optimizer=optimizer_arg)
    except ConfigError as e:
        raise JobError(f"config {config_name}: {e}") from None
    sampler = BatchSampler(corpus, engine.config.train_micro_batch_size_per_gpu, loaded.context, settings.seed)

    ckpt_dir = out / CHECKPOINTS
    if settings.resume:
        _, client = engine.load_checkpoint(ckpt_dir)
        sampler.load_state_dict(client["sampler"])
        history = _read_metrics(out / METRICS_FILE, upto=engine.global_steps)
        log(f"offload-train: resuming {out} at step {engine.global_steps}")
    else:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # a new run in this --out replaces the previous run's files
        history = []
        _write_json(out / RUN_FILE, {"model": settings.model, "corpus": settings.corpus, "context": settings.context,
                                     "seed": settings.seed, "config": settings.config, "config_name": config_name,
                                     "baseline": settings.baseline, "steps": settings.steps})
        _write_json(out / CONFIG_FILE, config)
    _rewrite_metrics(out / METRICS_FILE, history)
    for note in notes:
        log(f"offload-train: {note}")

    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = engine.precision
    if (engine_config.get("bf16") or {}).get("enabled") == "auto":
        precision += f" (bf16 auto: {choose_bf16(device)[1]})"  # initialize's decision; measured once
    log(f"offload-train: {loaded.description}, {n_params / 1e6:.2f}M params; {type(optimizer).__name__}, "
        f"{precision}, on {device}; {corpus.name} ({len(corpus):,} tokens); steps "
        f"{engine.global_steps} -> {settings.steps}; writing {out}")

    first_step = engine.global_steps
    t_run = time.perf_counter()
    loop = _train_loop(engine, optimizer, loaded, sampler, settings, stop, history, device)
    wall_s = time.perf_counter() - t_run
    interrupted = engine.global_steps < settings.steps
    checkpoint = _save(engine, sampler, ckpt_dir)

    steps_done = engine.global_steps - first_step
    summary = _summary(loaded, config_name, engine, optimizer, history, device, n_params, trainable,
                       steps_done=steps_done, tokens=steps_done * loop["tokens_per_step"], wall_s=wall_s,
                       fb_s=loop["forward_backward_s"], opt_s=loop["optimizer_s"], peak_rss=loop["peak_rss"],
                       interrupted=interrupted, checkpoint=checkpoint)
    _write_json(out / SUMMARY_FILE, summary)
    summary["plot"] = _plot(out, history, summary, log)
    return summary


def _train_loop(engine, optimizer, loaded, sampler, settings: JobSettings, stop, history: list, device) -> dict:
    """Optimizer steps until settings.steps or `stop`; appends one record per step to `history`
    and metrics.jsonl, checkpoints every settings.save_every steps. Returns the time split,
    tokens per step and peak RSS."""
    out = settings.out
    gas = engine.gradient_accumulation_steps
    tokens_per_step = sampler.batch * gas * loaded.context
    proc = psutil.Process()
    peak_rss = proc.memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fb_s = opt_s = 0.0
    bar = _progress_bar(settings, engine.global_steps)
    try:
        with open(out / METRICS_FILE, "a", encoding="utf-8") as metrics:
            while engine.global_steps < settings.steps and not stop.is_set():
                t_step = time.perf_counter()
                losses, step_fb, step_opt = [], 0.0, 0.0
                for _ in range(gas):
                    t = time.perf_counter()
                    x, y = sampler.next(device)
                    loss = F.cross_entropy(logits(loaded, x).flatten(0, 1).float(), y.flatten())
                    engine.backward(loss)
                    losses.append(loss.item())  # also waits for a GPU's backward: the split stays honest
                    t_opt = time.perf_counter()
                    engine.step()  # steps the optimizer at the last micro-batch of the window
                    step_opt += time.perf_counter() - t_opt
                    step_fb += t_opt - t
                step_s = time.perf_counter() - t_step
                fb_s, opt_s = fb_s + step_fb, opt_s + step_opt
                rss = proc.memory_info().rss
                peak_rss = max(peak_rss, rss)
                record = _metrics_record(engine, optimizer, losses, step_s, step_fb, step_opt, tokens_per_step,
                                         device, rss)
                history.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                    step=f"{step_s * 1e3:.0f}ms", refresh=False)
                done = engine.global_steps >= settings.steps
                if not done and settings.save_every and engine.global_steps % settings.save_every == 0:
                    _save(engine, sampler, out / CHECKPOINTS)
    finally:
        if bar is not None:
            bar.close()
    return {"forward_backward_s": fb_s, "optimizer_s": opt_s, "tokens_per_step": tokens_per_step,
            "peak_rss": peak_rss}


def _progress_bar(settings: JobSettings, first_step: int):
    if not settings.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=settings.steps, initial=first_step, desc="offload-train", unit="step", dynamic_ncols=True,
                leave=True)


def _metrics_record(engine, optimizer, losses, step_s, fb_s, opt_s, tokens, device, rss: int) -> dict:
    norm = engine.get_global_grad_norm()
    stats = optimizer.paging_stats() if hasattr(optimizer, "paging_stats") else None
    record = {
        "step": engine.global_steps, "loss": sum(losses) / len(losses), "lr": engine.get_lr()[0],
        "grad_norm": None if norm is None or not math.isfinite(float(norm)) else float(norm),
        "applied": engine.was_step_applied(), "step_s": step_s, "forward_backward_s": fb_s, "optimizer_s": opt_s,
        "tokens_per_s": tokens / step_s, "state_bytes": state_bytes_by_tier(optimizer, stats), "rss_bytes": rss,
    }
    if device.type == "cuda":
        record["gpu_bytes"] = torch.cuda.memory_allocated(device)
    if stats is not None:
        last = stats["last_step"]
        record.update({k: last[k] for k in ("fetch_s", "update_s", "writeback_s", "wait_s")})
    return record


def _save(engine, sampler: BatchSampler, ckpt_dir: Path) -> str:
    path = engine.save_checkpoint(ckpt_dir, client_state={"sampler": sampler.state_dict()})
    _prune(ckpt_dir, keep=KEEP_CHECKPOINTS)
    return str(path)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keeps the newest `keep` step checkpoints (by step number); `latest` names the newest."""
    tags = sorted((int(p.name[len("global_step"):]), p) for p in ckpt_dir.glob("global_step*")
                  if p.is_dir() and p.name[len("global_step"):].isdigit())
    for _, path in tags[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _read_metrics(path: Path, upto: int) -> list[dict]:
    """The saved run's records up to the checkpoint's step: steps a killed run logged after its
    last checkpoint are trained again, so they leave the curve."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything before it is good
        if record.get("step", upto + 1) <= upto:
            records.append(record)
    return records


def _rewrite_metrics(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _summary(loaded, config_name, engine, optimizer, history, device, n_params, trainable, *, steps_done,
             tokens, wall_s, fb_s, opt_s, peak_rss, interrupted, checkpoint) -> dict:
    stats = optimizer.paging_stats() if hasattr(optimizer, "paging_stats") else None
    totals = stats["totals"] if stats else {}
    tail = history[-10:] or [{"step": 0, "loss": float("nan")}]
    head = history[0] if history else tail[0]
    return {
        "model": loaded.description, "params": n_params,
        "param_bytes": sum(p.numel() * p.element_size() for p in engine.module.parameters()), "trainable": trainable, "device": str(device),
        "precision": engine.precision, "optimizer": type(optimizer).__name__, "config": config_name,
        "paged": stats is not None,
        "in_place": bool(stats) and stats["store"] == "cpu" and stats["executor"] == "cpu",
        "loss_start": head["loss"], "loss_start_step": head["step"],
        # The median of the last steps: one step's spike (a batch the model is briefly unstable on)
        # should not move the figure the run is judged by.
        "loss_end": statistics.median(r["loss"] for r in tail), "loss_end_steps": [tail[0]["step"], tail[-1]["step"]],
        "steps_done": steps_done, "last_step": engine.global_steps, "tokens": tokens, "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "step_s_mean": wall_s / steps_done if steps_done else 0.0,
        "state_bytes": state_bytes_by_tier(optimizer),
        "plain_adamw_bytes": plain_adamw_bytes(optimizer, engine.precision),
        "peak_rss_bytes": peak_rss,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "time": {"forward_backward_s": fb_s, "optimizer_s": opt_s,
                 **{k: totals.get(k, 0.0) for k in ("fetch_s", "update_s", "writeback_s", "wait_s")}},
        # paging.overlap "exact": how the steps' early pages fared ([Note: speculative step])
        "speculation": stats["speculation"] if stats and stats["speculation"]["steps"] else None,
        # paging.overlap "delayed" ([Note: delayed update])
        "delayed": None if engine.delayed is None else {
            "steps_delayed": engine.delayed.steps_delayed, "warmup_steps": engine.delayed.warmup_steps,
            "param_copy_bytes": engine.delayed.shadow_bytes},
        "interrupted": interrupted, "checkpoint": checkpoint,
    }


def _plot(out: Path, history: list[dict], summary: dict, log) -> str | None:
    try:
        from .plot import write_plot
    except ImportError:
        log("offload-train: no plot (matplotlib is not installed: pip install matplotlib)")
        return None
    return str(write_plot(out / PLOT_FILE, history, summary))
