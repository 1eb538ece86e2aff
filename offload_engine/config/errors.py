"""The one exception a config load raises, the warning category for keys that have no effect
here, and the small text helpers every error message is built from.

Every problem is reported as ``(path, message)``: ``path`` is the dotted key path inside the
config (``optimizer.params.lr``, ``zero_optimization.offload_optimizer.nvme_path``; ``""`` for
the config as a whole) and ``message`` says what is wrong, what is allowed and, for a name that
is close to a valid one, which one was probably meant.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence

__all__ = ["ConfigError", "ConfigWarning", "closest", "did_you_mean", "join_path", "one_of", "show"]

Problem = tuple[str, str]


class ConfigError(ValueError):
    """A config that cannot be used. ``errors`` lists every problem found as ``(path, message)``
    pairs (one per key); ``path`` is the first one's key path (``""``: the config as a whole).

    ``str(err)`` names each key path with its message, one line per problem, preceded by the
    file name when the config came from a file.
    """

    def __init__(self, errors: Sequence[Problem], *, source: str | None = None):
        errors = [(str(path), str(message)) for path, message in errors]
        if not errors:
            raise ValueError("ConfigError needs at least one (path, message) problem")
        self.errors: list[Problem] = errors
        self.path: str = errors[0][0]
        self.source = source
        super().__init__(self._render())

    @classmethod
    def single(cls, path: str, message: str, *, source: str | None = None) -> ConfigError:
        """A ConfigError for one problem."""
        return cls([(path, message)], source=source)

    def _render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [_line(path, message) for path, message in self.errors]
        if len(lines) == 1:
            return f"invalid config{where}: {lines[0]}"
        body = "\n".join(f"  - {line}" for line in lines)
        return f"invalid config{where}: {len(lines)} problems\n{body}"

    def __reduce__(self):  # picklable (multiprocessing, pytest-xdist) despite the keyword argument
        return _rebuild, (self.errors, self.source)


def _rebuild(errors, source):
    return ConfigError(errors, source=source)


class ConfigWarning(UserWarning):
    """A key that is accepted but has no effect in offload_engine (a DeepSpeed performance or
    logging hint, or a DeepSpeed setting given its default value). One warning per key."""


def _line(path: str, message: str) -> str:
    return f"{path}: {message}" if path else message


def join_path(*parts) -> str:
    """``join_path("optimizer", "params", "lr") == "optimizer.params.lr"``; list indices are
    written ``betas[1]``."""
    out = ""
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif part != "":
            out = f"{out}.{part}" if out else str(part)
    return out


def show(value, limit: int = 60) -> str:
    """A short JSON-like rendering of a config value for messages (``'yes'``, ``-0.1``, ``[...]``)."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, allow_nan=True, default=repr)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def closest(name, choices: Iterable[str]) -> str | None:
    """The valid name ``name`` most probably meant: a case-insensitive exact match first, then
    the nearest by difflib's ratio (at least 0.6), else None."""
    if not isinstance(name, str):
        return None
    choices = [c for c in choices if isinstance(c, str)]
    for choice in choices:
        if choice.lower() == name.lower():
            return choice
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def did_you_mean(name, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` when some choice is close to ``name``, else ``""``."""
    choices = list(choices)
    best = closest(name, choices)
    return f"; did you mean {best!r}?" if best is not None and best != name else ""


def one_of(choices: Iterable) -> str:
    """``"'cpu' or 'nvme'"``, ``"'a', 'b' or 'c'"``."""
    items = [repr(c) if isinstance(c, str) else show(c) for c in choices]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]
