"""`offload-train` (also `python -m offload_engine.train`): train a small GPT-style model while
its optimizer state lives off the device, then show what that saved and what it cost.

With no arguments: the built-in 'small' model on the built-in corpus, 300 steps with
configs/default.json (PagedAdamW8bit, bf16), on the GPU when there is one; a few minutes on 2
CPU cores. Files go to --out: metrics.jsonl, training.png, summary.json, checkpoints/.

Exit status: 0 done, 1 failed, 2 bad input, 130 interrupted (Ctrl-C saves a checkpoint first;
--resume continues from it)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from . import job
from .data import CorpusError
from .models import SIZES, ModelChoiceError
from .report import format_compare, format_summary

PROG = "offload-train"
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
COMPARE_STEPS = 60


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 epilog="Docs: docs/quickstart.md. Every config key: docs/config.md.")
    ap.add_argument("--config", help="engine config JSON (default: the embedded configs/default.json)")
    ap.add_argument("--steps", type=_positive,
                    help=f"optimizer steps to reach (default {job.DEFAULT_STEPS}; with --resume the saved run's, "
                         "and a larger value trains on); a new run's schedule with an end is rescaled to it")
    ap.add_argument("--model", help=f"built-in size ({', '.join(SIZES)}; default small), or a local Hugging Face "
                                    "model directory or transformers config.json (needs transformers)")
    ap.add_argument("--out", type=Path, default=job.JobSettings.out,
                    help="run directory for metrics, plot, summary and checkpoints (default: %(default)s)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    ap.add_argument("--seed", type=int, help="seeds the model's init and the batch order (default 0)")
    ap.add_argument("--corpus", help="a UTF-8 text file to train on (default: the built-in corpus)")
    ap.add_argument("--context", type=_positive, help="tokens per training window (default: the model size's)")
    ap.add_argument("--save-every", type=int, default=100,
                    help="checkpoint every N steps, and at the end (0: only at the end; default %(default)s)")
    ap.add_argument("--compare", action="store_true",
                    help=f"run the same short job (default {COMPARE_STEPS} steps) with torch AdamW and with the "
                         "config's optimizer, each in its own process, and print their memory and time side by side")
    ap.add_argument("--baseline", action="store_true",
                    help="train with torch.optim.AdamW on fp32 params instead of the config's optimizer (what "
                         "--compare runs as its first leg)")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--plan", action="store_true",
                    help="place the optimizer state where offload-plan's first choice puts it for this model on this "
                         "machine (the config's paging section and optimizer type; a cached probe, else one taken "
                         "now, about 20 s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line per warning, as the CLI's own messages are (a config warning names its key);
    Python's default adds the file, the line number and the source line of the warn() call."""
    print(f"{PROG}: warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(args)


def _main(args) -> int:
    try:
        if args.compare:
            return _compare(args)
        return _train(args)
    except job.NothingToDo as done:
        print(f"{PROG}: {done}")
        saved = done.out / job.SUMMARY_FILE
        if saved.is_file():
            print(format_summary(json.loads(saved.read_text(encoding="utf-8"))))
        return 0
    except (job.JobError, ModelChoiceError, CorpusError) as e:
        return _fail(args, e, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        # A second Ctrl-C while the first one's checkpoint is being written, or one before
        # training started: nothing more is saved.
        print(f"{PROG}: interrupted again; exiting without saving", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- one line for the user; --debug shows the traceback
        return _fail(args, e, EXIT_FAILED)


def _fail(args, err: BaseException, code: int) -> int:
    if args.debug:
        raise err
    text = " ".join(str(err).split()) or type(err).__name__
    prefix = "" if code == EXIT_BAD_INPUT else f"{type(err).__name__}: "
    hint = "" if code == EXIT_BAD_INPUT else " (--debug shows the traceback)"
    print(f"{PROG}: error: {prefix}{text}{hint}", file=sys.stderr)
    return code


def _settings(args) -> job.JobSettings:
    return job.JobSettings(config=args.config, steps=args.steps, model=args.model, out=args.out, resume=args.resume,
                           seed=args.seed, corpus=args.corpus, context=args.context, baseline=args.baseline,
                           save_every=args.save_every, progress=not args.no_progress, device=args.device,
                           plan=args.plan)


class _StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop after the optimizer step in progress and
    save a checkpoint. Stopping inside a step would leave params and paged state half updated,
    so the handler only sets an event the training loop checks between steps; a second Ctrl-C
    restores the default handler's KeyboardInterrupt for a user who will not wait."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self.event

    def _handle(self, signum, frame):
        self.event.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _train(args) -> int:
    with _StopOnSignal() as stop:
        summary = job.run(_settings(args), stop=stop, log=lambda msg: print(msg, flush=True))
    if summary["interrupted"]:
        print(f"{PROG}: interrupted at step {summary['last_step']}; checkpoint saved in {summary['checkpoint']}; "
              f"continue with: {PROG} --out {args.out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(summary))
    if summary.get("plot"):
        print(f"files: {args.out}/{job.METRICS_FILE}, {summary['plot']}, {args.out}/{job.SUMMARY_FILE}, "
              f"checkpoint {summary['checkpoint']}")
    return 0


def _compare(args) -> int:
    """Each leg runs in a fresh process: a process's peak RSS is a high-water mark, so a second
    leg in the same process would report the first one's peak as its own."""
    if args.resume or args.baseline:
        raise job.JobError("--compare runs two fresh jobs; it does not take --resume or --baseline")
    job.prepare_out(args.out)
    steps = args.steps or COMPARE_STEPS
    passed = []
    for flag in ("config", "model", "seed", "corpus", "context", "device"):
        value = getattr(args, flag)
        if value is not None:
            passed += [f"--{flag}", str(value)]
    if args.no_progress:
        passed.append("--no-progress")
    summaries = {}
    # Ctrl-C reaches the leg running in the foreground too (same process group); it stops after
    # its step and saves. This process only notes the request: the default handler would raise
    # KeyboardInterrupt here, and subprocess would kill the leg in the middle of its save.
    with _StopOnSignal() as stop:
        for leg, extra in (("torch_adamw", ["--baseline"]), ("offload_engine", ["--plan"] if args.plan else [])):
            out = args.out / leg
            print(f"{PROG} --compare: {leg} ({steps} steps) -> {out}", flush=True)
            cmd = [sys.executable, "-m", "offload_engine.train", "--steps", str(steps), "--out", str(out),
                   "--save-every", "0", *passed, *extra]
            code = subprocess.call(cmd, env=os.environ.copy())
            if stop.is_set():
                print(f"{PROG}: --compare interrupted during the {leg} leg", file=sys.stderr)
                return EXIT_INTERRUPTED
            if code != 0:
                print(f"{PROG}: error: the {leg} leg exited with status {code}", file=sys.stderr)
                return code
            summaries[leg] = json.loads((out / job.SUMMARY_FILE).read_text(encoding="utf-8"))
    print(format_compare(summaries["torch_adamw"], summaries["offload_engine"]))
    return 0
