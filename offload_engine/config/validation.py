"""pydantic's ValidationError -> ``(path, message)`` problems in this package's wording.

Each message says what the key accepts (introspect.describe_field) and what it got; an unknown
key or a misspelled choice gets the closest valid name. The union tags pydantic adds to
locations (``optimizer.AdamW.params.lr``) are dropped: the user wrote ``optimizer.params.lr``.
"""
from __future__ import annotations

from pydantic import BaseModel, ValidationError

from .deepspeed_keys import DEEPSPEED_KEYS, HINT
from .errors import did_you_mean, join_path, show
from .introspect import describe_field, literal_choices, submodel, walk

__all__ = ["problems_from_validation_error", "unknown_key_message"]

_TYPE_ERRORS = {"bool_type", "int_type", "float_type", "string_type", "finite_number", "literal_error",
                "greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_too_short",
                "too_short", "too_long", "tuple_type", "list_type", "int_from_float", "bool_parsing",
                "int_parsing", "float_parsing"}
_OBJECT_ERRORS = {"model_type", "model_attributes_type", "dict_type"}

_AUTO_HINT = ("; 'auto' is a placeholder that the Hugging Face Trainer fills in before DeepSpeed reads the "
              "config: write the value itself")


def unknown_key_message(name, section_path: str, allowed) -> str:
    """The message for a key ``name`` that ``section_path`` does not have."""
    allowed = sorted(allowed)
    # DeepSpeed hints are accepted too: a misspelled one ("overlap_com") should be pointed at.
    hints = [k for k, v in DEEPSPEED_KEYS.get(section_path, {}).items() if v.kind == HINT]
    if not isinstance(name, str):
        return f"keys must be strings, got {show(name)}"
    where = f"section '{section_path}'" if section_path else "the config"
    return (f"unknown key {name!r} in {where}{did_you_mean(name, allowed + hints)} "
            f"(allowed: {', '.join(allowed)})")


def _message(error: dict, root: type[BaseModel], data) -> tuple[str, str]:
    kind = error["type"]
    loc = tuple(error.get("loc", ()))
    shown, parent, field = walk(root, loc)
    got = error.get("input")
    if shown and not isinstance(shown[-1], str) and kind != "extra_forbidden":
        # An element of a list/tuple (betas[1]): report the whole value at the key that holds it.
        while shown and not isinstance(shown[-1], str):
            shown.pop()
            loc = loc[:-1]
        shown, parent, field = walk(root, loc)
        got = _value_at(data, shown)
        if field is not None:
            return join_path(*shown), f"must be {describe_field(field)}, got {show(got)}"
    path = join_path(*shown)
    if kind == "extra_forbidden":
        section = join_path(*shown[:-1])
        allowed = list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        return path, unknown_key_message(shown[-1] if shown else "", section, allowed)
    if kind == "missing":
        node = submodel(field.annotation) if field is not None else None
        if isinstance(node, type) and issubclass(node, BaseModel):
            required = [k for k, f in node.model_fields.items() if f.is_required()]
            return path, f"required key is missing: an object with {', '.join(required)}"
        return path, "required key is missing" + (f": {describe_field(field)}" if field is not None else "")
    if kind in ("value_error", "assertion_error"):
        text = str(error.get("ctx", {}).get("error", error.get("msg", "")))
        return path, text + (_AUTO_HINT if got == "auto" else "")
    if kind in _OBJECT_ERRORS:
        node = submodel(field.annotation) if field is not None else None
        if isinstance(node, type) and issubclass(node, BaseModel):
            keys = ", ".join(node.model_fields)
            return path, f"must be an object with keys among {keys}, got {show(got)}"
        return path, f"must be an object, got {show(got)}"
    if kind in _TYPE_ERRORS:
        if field is not None:
            allowed = describe_field(field)
        else:  # an element of a list or tuple: pydantic's wording for the element
            allowed = _element_text(error)
        text = f"must be {allowed}, got {show(got)}"
        choices = literal_choices(field)
        if kind == "literal_error" and choices:
            text += did_you_mean(got, [c for c in choices if isinstance(c, str)])
        if got == "auto":
            text += _AUTO_HINT
        return path, text
    return path, f"{error.get('msg', 'invalid value')}, got {show(got)}"


def _element_text(error: dict) -> str:
    msg = str(error.get("msg", ""))
    for prefix in ("Input should be ", "Value should be "):
        msg = msg.removeprefix(prefix)
    msg = msg.replace("a valid number", "a number")
    return msg or "valid"


def _value_at(data, parts):
    for part in parts:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def problems_from_validation_error(err: ValidationError, root: type[BaseModel], data) -> list[tuple[str, str]]:
    """One problem per key path (pydantic may report a path twice: once per element of a list,
    once per union member). ``data``: the validated input, to quote whole values."""
    problems: list[tuple[str, str]] = []
    seen = set()
    for error in err.errors(include_url=False):
        path, message = _message(error, root, data)
        if path in seen:
            continue
        seen.add(path)
        problems.append((path, message))
    return problems

