"""Reading the section models back: which model sits at a key path, and what a field accepts in
words ("an integer >= 1", "'cpu' or 'nvme'"). Error messages (validation.py) and the generated
reference (docs.py) share these, so both say the same thing about every key.
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .errors import one_of

__all__ = ["Node", "describe_field", "describe_type", "is_tag_map", "literal_choices", "submodel", "walk"]

# A node of the schema tree: a section model, a {tag: model} map (optimizer/scheduler types),
# or None (a leaf value).
Node = type[BaseModel] | dict[str, type[BaseModel]] | None
_UNIONS = (typing.Union, types.UnionType)  # Optional[X] / Union[X, Y] and X | Y


def _is_union(tp) -> bool:
    return get_origin(tp) in _UNIONS


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def is_tag_map(node) -> bool:
    return isinstance(node, dict)


def _strip_annotated(tp) -> tuple[Any, list]:
    metadata: list = []
    while get_origin(tp) is Annotated:
        args = get_args(tp)
        tp, metadata = args[0], metadata + list(args[1:])
    return tp, metadata


def _non_null(tp) -> tuple[Any, bool]:
    """(tp without None, whether None was allowed)."""
    tp, _ = _strip_annotated(tp)
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        nullable = len(args) < len(get_args(tp))
        if len(args) == 1:
            return args[0], nullable
        return typing.Union.__getitem__(tuple(args)), nullable
    return tp, False


def submodel(annotation) -> Node:
    """The model (or tag map of models) a field's value is validated as, else None."""
    tp, _ = _non_null(annotation)
    tp, _ = _strip_annotated(tp)
    if _is_model(tp):
        return tp
    if _is_union(tp):
        members = [_strip_annotated(a)[0] for a in get_args(tp)]
        if members and all(_is_model(m) and "type" in m.model_fields for m in members):
            return {get_args(m.model_fields["type"].annotation)[0]: m for m in members}
    return None


def walk(root: type[BaseModel], loc) -> tuple[list, Node, FieldInfo | None]:
    """Follows a pydantic error location from ``root``. Returns (the path parts a user sees, i.e.
    without the union tags; the node holding the last part; the FieldInfo of the last part or
    None)."""
    node: Node = root
    shown: list = []
    parent: Node = None
    field: FieldInfo | None = None
    for part in loc:
        if is_tag_map(node):
            node = node.get(part) if isinstance(part, str) else None
            continue
        shown.append(part)
        parent = node
        if _is_model(node) and isinstance(part, str):
            field = node.model_fields.get(part)
            node = submodel(field.annotation) if field is not None else None
        else:
            field, node = None, None
    return shown, parent, field


def literal_choices(field: FieldInfo | None) -> list[Any]:
    if field is None:
        return []
    tp, _ = _non_null(field.annotation)
    tp, _ = _strip_annotated(tp)
    return list(get_args(tp)) if get_origin(tp) is Literal else []


_BOUNDS = ((at.Ge, ">=", "ge"), (at.Gt, ">", "gt"), (at.Le, "<=", "le"), (at.Lt, "<", "lt"))


def _bounds(metadata) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            parts.append(_bounds(item.metadata))
            continue
        for cls, op, attr in _BOUNDS:
            if isinstance(item, cls):
                parts.append(f"{op} {_num(getattr(item, attr))}")
    return " and ".join(p for p in parts if p)


def _num(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _min_len(metadata) -> int:
    for item in metadata:
        if isinstance(item, FieldInfo):
            n = _min_len(item.metadata)
            if n:
                return n
        if isinstance(item, at.MinLen):
            return item.min_length
    return 0


def describe_type(tp, metadata=()) -> str:
    """A type annotation (plus constraints) in words."""
    tp, inner = _strip_annotated(tp)
    metadata = list(metadata) + inner
    base, nullable = _non_null(tp)
    if nullable and get_origin(_strip_annotated(base)[0]) is Literal:
        return one_of([None, *get_args(_strip_annotated(base)[0])])
    if nullable:
        return f"null or {describe_type(base, metadata)}"
    tp = base
    origin = get_origin(tp)
    bounds = _bounds(metadata)
    suffix = f" {bounds}" if bounds else ""
    if origin is Literal:
        return one_of(get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"an integer{suffix}"
    if tp is float:
        return f"a number{suffix}"
    if tp is str:
        return "a non-empty string" if _min_len(metadata) else "a string"
    if origin is tuple:
        items = [describe_type(a) for a in get_args(tp)]
        if len(set(items)) == 1:
            each = items[0].replace("a number ", "") if items[0] != "a number" else ""
            return f"a list of {len(items)} numbers" + (f", each {each}" if each else "")
        return f"a list [{', '.join(items)}]"
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        text = describe_type(item)
        return f"a list of {text[2:] + 's' if text.startswith('a ') else text}"
    if _is_union(tp):
        members = [_strip_annotated(a)[0] for a in get_args(tp)]
        if all(_is_model(m) for m in members):
            return "an object"
        return " or ".join(describe_type(a) for a in get_args(tp))
    if _is_model(tp):
        return "an object"
    return getattr(tp, "__name__", str(tp))


def describe_field(field: FieldInfo) -> str:
    """What a field accepts, in words: a field's own ``json_schema_extra={"allowed": ...}`` when
    its validator checks more than the annotation says, else derived from the annotation."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("allowed"), str):
        return extra["allowed"]
    return describe_type(field.annotation, field.metadata)
