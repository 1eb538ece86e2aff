"""``load_config``: a JSON file or a dict -> a checked EngineConfig, or one ConfigError listing
every problem found.

The steps, in order:
  1. read the file (JSON only; a syntax error is reported with its line and column, a key given
     twice in one object is an error rather than JSON's silent "last one wins");
  2. copy the dict without the ``_comment*`` keys (JSON has no comments: any key starting with
     ``_comment`` is documentation, at any depth);
  3. match optimizer/scheduler type names case-insensitively (DeepSpeed's old ``bfloat16``
     section name becomes ``bf16``);
  4. take out the DeepSpeed-only keys (deepspeed_keys.py): warnings or errors;
  5. validate the sections (models.py) and word pydantic's errors (validation.py);
  6. check what involves several keys (resolve.py): batch sizes, precision, paging against
     offload_optimizer, the optimizer class.
Warnings are issued only for a config that loads.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

from pydantic import ValidationError

from .auto import fill_auto
from .deepspeed_keys import sort_deepspeed_keys
from .errors import ConfigError, ConfigWarning, closest, join_path, one_of, show
from .models import EngineConfig
from .optimizer_models import (
    DEEPSPEED_ONLY_OPTIMIZERS,
    ENGINE_OWNED_PARAMS,
    OPTIMIZER_KINDS,
)
from .resolve import (
    PAGED_CLASSES,
    check_optimizer,
    check_paging,
    precision_problems,
    resolve_batch,
    scheduler_problems,
)
from .scheduler_models import DEEPSPEED_ONLY_SCHEDULERS, SCHEDULER_SECTIONS
from .validation import problems_from_validation_error

__all__ = ["COMMENT_PREFIX", "load_config"]

COMMENT_PREFIX = "_comment"
Problem = tuple[str, str]
# Paging keys that only a paged optimizer reads.
_PAGE_KEYS = ("page_size_mb", "prefetch_depth", "io_threads", "executor", "pin_memory")


def load_config(config: str | os.PathLike[str] | dict[str, Any], world_size: int = 1) -> EngineConfig:
    """Loads and checks an engine config. ``config``: the path of a JSON file, or a dict (which is
    not modified). ``world_size``: the number of data-parallel ranks the batch sizes are resolved
    for. Raises ConfigError (a ValueError) naming every bad key; warns (ConfigWarning) once per
    accepted key that has no effect."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    source = None
    if isinstance(config, (str, os.PathLike)):
        source = os.fspath(config)
        raw = _read_json(source)
    else:
        raw = config
    if not isinstance(raw, dict):
        raise ConfigError.single("", f"the config must be a JSON object (a dict) or the path of a JSON file, got "
                                     f"{type(raw).__name__} {show(raw)}", source=source)
    data, problems, notes, refused = _prepare(raw)
    try:
        cfg = EngineConfig.model_validate(data)
    except ValidationError as err:
        problems += [p for p in problems_from_validation_error(err, EngineConfig, data) if p[0] not in refused]
        cfg = None
    if cfg is None or problems:
        raise ConfigError(_in_input_order(_as_written(problems, raw), raw), source=source)

    (train, micro, accum), batch = resolve_batch(cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
                                                 cfg.gradient_accumulation_steps, world_size)
    problems += batch + precision_problems(cfg) + scheduler_problems(cfg)
    settings, paging = check_paging(cfg)
    problems += paging
    resolved = None
    if settings is not None and cfg.optimizer is not None:
        resolved, optimizer = check_optimizer(cfg, settings)
        problems += optimizer
    if problems:
        raise ConfigError(_in_input_order(_as_written(problems, raw), raw), source=source)
    if cfg.optimizer is not None and resolved is not None and resolved[0] not in PAGED_CLASSES:
        notes += [f"paging.{key} has no effect: the optimizer resolves to {resolved[0]}, which uses no page store"
                  for key in _PAGE_KEYS if key in cfg.paging.model_fields_set]

    cfg = cfg.model_copy(update={"train_batch_size": train, "train_micro_batch_size_per_gpu": micro,
                                 "gradient_accumulation_steps": accum})
    cfg._world_size = world_size
    for note in notes:
        if "bfloat16" in raw and note.startswith("bf16."):
            note = "bfloat16" + note[4:]
        warnings.warn(note, ConfigWarning, stacklevel=2)
    return cfg


def _prepare(raw: dict) -> tuple[dict, list[Problem], list[str], set[str]]:
    """Steps 2-4 of the module docstring: (the data to validate, problems, warnings, the paths
    whose "auto" was refused)."""
    data = _without_comments(raw)
    problems: list[Problem] = list(getattr(raw, "duplicate_problems", ()))
    if "bfloat16" in data:  # DeepSpeed's old name for the bf16 section
        if "bf16" in data:
            problems.append(("bfloat16", "bf16 and bfloat16 (its old name) are both given; keep bf16"))
            del data["bfloat16"]
        else:
            data["bf16"] = data.pop("bfloat16")
    algorithm = _canonical_types(data, problems)
    ds_problems, notes = sort_deepspeed_keys(data, algorithm)
    problems += ds_problems
    refused = fill_auto(data, problems, notes)
    scheduler = data.get("scheduler")
    params = scheduler.get("params") if isinstance(scheduler, dict) else None
    if isinstance(params, dict) and params.get("warmup_num_steps") == 0 and params["warmup_num_steps"] is not False:
        notes.append("scheduler.params.warmup_num_steps = 0 (the Hugging Face Trainer's default) warms up over 2 "
                     "steps, as DeepSpeed before 0.19.6 did (0.19.6 and later refuse 0)")
    _check_engine_owned(data, problems)
    return data, problems, notes, refused


def _as_written(problems: list[Problem], raw: dict) -> list[Problem]:
    """Paths under bf16 renamed back to bfloat16 when the user wrote the old name."""
    if "bfloat16" not in raw or "bf16" in raw:
        return problems
    return [("bfloat16" + path[4:] if path.split(".")[0] == "bf16" else path, message) for path, message in problems]


# ---- reading ------------------------------------------------------------------------------------
class _ObjectWithDuplicates(dict):
    """A JSON object; ``duplicates`` lists the keys written more than once in it (json itself
    keeps the last value silently)."""

    duplicates: tuple[str, ...] = ()


def _pairs_hook(pairs):
    obj = _ObjectWithDuplicates(pairs)
    if len(obj) != len(pairs):
        seen, dups = set(), []
        for key, _ in pairs:
            if key in seen and key not in dups:
                dups.append(key)
            seen.add(key)
        obj.duplicates = tuple(dups)
    return obj


def _duplicate_problems(value, path="") -> list[Problem]:
    found: list[Problem] = []
    if isinstance(value, dict):
        for key in getattr(value, "duplicates", ()):
            found.append((join_path(path, key), "given more than once in the same object; keep one"))
        for key, item in value.items():
            found += _duplicate_problems(item, join_path(path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _duplicate_problems(item, join_path(path, i))
    return found


class _Root(dict):
    """The file's top-level object, carrying the duplicate keys found anywhere in the file."""

    duplicate_problems: tuple[Problem, ...] = ()


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError.single("", f"config file not found: {path}") from None
    except (OSError, ValueError) as err:  # a directory, no permission, a NUL in the name, not UTF-8
        raise ConfigError.single("", f"cannot read config file {path}: {err}") from None
    try:
        value = json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as err:
        raise ConfigError.single("", f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column "
                                     f"{err.colno}") from None
    except RecursionError:
        raise ConfigError.single("", f"{path} is nested too deeply") from None
    if isinstance(value, dict):
        root = _Root(value)
        root.duplicate_problems = tuple(_duplicate_problems(value))
        return root
    return value


def _without_comments(value):
    """A copy of ``value`` without ``_comment*`` keys at any depth (the input is not modified)."""
    if isinstance(value, dict):
        return {key: _without_comments(item) for key, item in value.items()
                if not (isinstance(key, str) and key.startswith(COMMENT_PREFIX))}
    if isinstance(value, list):
        return [_without_comments(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_without_comments(item) for item in value)
    return value


# ---- type names ---------------------------------------------------------------------------------
# section, its type names, the DeepSpeed names it does not provide
_TYPED_SECTIONS = (("optimizer", tuple(OPTIMIZER_KINDS), DEEPSPEED_ONLY_OPTIMIZERS),
                   ("scheduler", tuple(SCHEDULER_SECTIONS), DEEPSPEED_ONLY_SCHEDULERS))


def _canonical_types(data: dict, problems: list[Problem]) -> str | None:
    """Replaces optimizer.type / scheduler.type by their canonical spelling, or records a problem
    and drops the section. Returns the optimizer's algorithm when known."""
    algorithm = None
    for section, names, foreign in _TYPED_SECTIONS:
        if section not in data or data[section] is None:
            data.pop(section, None)
            continue
        value = data[section]
        if not isinstance(value, dict):
            problems.append((section, (f"must be an object {{\"type\": ..., \"params\": {{...}}}} or null, got "
                                       f"{show(value)}")))
            del data[section]
            continue
        if value.get("params", {}) is None:  # DeepSpeed reads a null params as no params
            value.pop("params")
        name = value.get("type")
        canonical = next((n for n in names if isinstance(name, str) and n.lower() == name.lower()), None)
        if canonical is not None:
            value["type"] = canonical
            if section == "optimizer":
                algorithm = OPTIMIZER_KINDS[canonical].algorithm
            continue
        path = join_path(section, "type")
        if "type" not in value:
            problems.append((path, f"required: one of {one_of(names)}"))
        elif isinstance(name, str) and name.lower() in {n.lower() for n in foreign}:
            problems.append((path, (f"{name!r} is a DeepSpeed {section} that offload_engine does not provide; "
                                    f"supported: {', '.join(names)}")))
        else:
            best = closest(name, names)
            hint = f"; did you mean {best!r}?" if best else ""
            problems.append((path, f"unknown {section} type {show(name)}{hint} (supported: {', '.join(names)})"))
        del data[section]
    return algorithm


def _check_engine_owned(data: dict, problems: list[Problem]) -> None:
    """The paged classes' store/page keywords come from the paging section, not optimizer.params."""
    params = data.get("optimizer", {}).get("params") if isinstance(data.get("optimizer"), dict) else None
    if not isinstance(params, dict):
        return
    for key in ENGINE_OWNED_PARAMS:
        if key in params:
            del params[key]
            problems.append((f"optimizer.params.{key}", (f"set by the engine from paging.{key}; move it to the paging "
                                                         "section")))


def _in_input_order(problems: list[Problem], raw) -> list[Problem]:
    """Problems without repeats, ordered as their keys appear in the input."""
    def position(path: str):
        node, where = raw, []
        for part in path.split(".") if path else []:
            keys = list(node) if isinstance(node, dict) else []
            where.append(keys.index(part) if part in keys else len(keys))
            node = node.get(part) if isinstance(node, dict) else None
        return where
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda problem: position(problem[0]))
