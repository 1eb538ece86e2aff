"""World-size-free optimizer checkpoints: each rank's state is written with the element ranges
of the params it covers, and read back into any other partition of the same params.

[Note: world-size-free checkpoints] A data-parallel rank's optimizer holds state for *slices*
of the model's params ([Note: partitioned state] in partition.py). At save, every rank writes
its own file, ``optimizer_rank<r>_of<w>.pt`` (``optimizer.pt`` in one process): its
optimizer's state dict in the optimizer's own format (fp32 moments, or 8-/4-bit codes with
their absmax), keyed by param *name*, with ``slices`` {name: [start, end)} giving the
elements of the flattened param each entry covers. No rank gathers another's state, so no
process ever holds more than its own share. The manifest's ``optimizer`` section records the
layout: world size, split points, each param's name and size, the param groups by name, and
per file the ranges it holds.

At load, each rank works out the ranges its own optimizer holds now (its shards at the new
world size, or whole params in one process), reads only the files whose ranges overlap them,
and assembles each of its params' state from the overlapping pieces:
- one piece that is exactly the range: its state as saved (the same world size);
- pieces in one quantized format and block size, cut on block boundaries (partition points
  are multiples of 4096 elements and blocks divide 4096, so they are): the codes and absmax
  of the blocks concatenated, bit for bit;
- otherwise (fp32 state, or pieces in different formats, as in checkpoints written while
  ``min_8bit_size`` still counted each shard's elements rather than its param's): per-element
  fp32 values, dequantized where quantized, concatenated.
The optimizer's load_state_dict then converts the assembled state into its own format and
block size (re-quantizing only when those differ). fp32 state therefore reloads exactly at
any world size; quantized state reloads exactly while the format and block size stay, and
within the quantization bounds when they change. Scalars (``step``) must agree among the
pieces of a param.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import FORMATS, codec
from .checkpoint import CheckpointError

SINGLE_FILE = "optimizer.pt"
LAYOUT_KEY = "optimizer"  # the manifest's section describing the optimizer files
LAYOUT_VERSION = 1
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}  # the code map each moment is quantized with
_META = ("format", "block_size")


def file_name(rank: int, world: int) -> str:
    return SINGLE_FILE if world == 1 else f"optimizer_rank{rank}_of{world}.pt"


@dataclass(frozen=True)
class Slice:
    """Elements [start, end) of the flattened param `name` (numel elements, shape `shape`)
    held by one position of an optimizer; `shape` is the shape of the tensor the optimizer holds."""
    name: str
    start: int
    end: int
    numel: int
    shape: tuple


# ---- save -----------------------------------------------------------------------------------
def named_state(sd: dict, slices: list[Slice]) -> dict:
    """An optimizer's state_dict (params numbered in its order) keyed by param name, with
    ``slices`` when some position holds less than its whole param."""
    names = [s.name for s in slices]
    out = {**sd, "state": {names[i]: s for i, s in sd["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    if any(s.start != 0 or s.end != s.numel for s in slices):
        out["slices"] = {s.name: [s.start, s.end] for s in slices}
    return out


def layout(world: int, points: list[int], params: list[tuple[str, int]], groups: list[list[str]],
           files: dict[str, list[tuple[str, int, int]]]) -> dict:
    """The manifest section of a checkpoint's optimizer files ([Note: world-size-free checkpoints])."""
    return {"version": LAYOUT_VERSION, "world": world, "split_points": list(points),
            "params": [[name, numel] for name, numel in params], "groups": [list(g) for g in groups],
            "files": {f: {name: [a, b] for name, a, b in ranges} for f, ranges in files.items()}}


# ---- load -----------------------------------------------------------------------------------
def read_layout(manifest: dict, where, numels: dict[str, int]) -> dict | None:
    """The manifest's optimizer layout, checked (each file's ranges, every param covered once
    and sizes that match the model's `numels`); None for a single-file checkpoint written
    before layouts were recorded."""
    lay = manifest.get(LAYOUT_KEY)
    if lay is None:
        return None
    try:
        if lay["version"] != LAYOUT_VERSION:
            raise CheckpointError(f"{where}: optimizer layout version {lay['version']!r} is not supported (this "
                                  f"version reads {LAYOUT_VERSION})")
        saved_numels = {str(name): int(n) for name, n in lay["params"]}
        groups = [[str(name) for name in g] for g in lay["groups"]]
        files = {str(f): {str(name): (int(a), int(b)) for name, (a, b) in ranges.items()}
                 for f, ranges in lay["files"].items()}
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: malformed optimizer layout ({type(err).__name__}: {err})") from None
    for name, n in saved_numels.items():
        if name in numels and numels[name] != n:
            raise CheckpointError(f"{where}: param {name} has {n} elements in the checkpoint, the model's has "
                                  f"{numels[name]}")
    pieces: dict[str, list[tuple[int, int]]] = {}
    for ranges in files.values():
        for name, (a, b) in ranges.items():
            pieces.setdefault(name, []).append((a, b))
    for name, n in saved_numels.items():
        covered = 0
        for a, b in sorted(pieces.get(name, [])):
            if a != covered or b <= a:
                break
            covered = b
        if covered != n or len(pieces.get(name, [])) != len({r for r in pieces.get(name, [])}):
            raise CheckpointError(f"{where}: the optimizer files' ranges of {name} do not cover its {n} elements "
                                  f"exactly once: {sorted(pieces.get(name, []))}")
    unknown = sorted(set(pieces) - set(saved_numels))
    if unknown:
        raise CheckpointError(f"{where}: optimizer files hold ranges of params the layout does not list: "
                              f"{unknown[:5]}")
    return {"world": lay.get("world"), "groups": groups, "numels": saved_numels, "files": files}


def files_to_read(lay: dict | None, targets: list[Slice]) -> list[str]:
    """The optimizer files holding some of `targets`' elements (at least one file: the group
    settings come from it)."""
    if lay is None:
        return [SINGLE_FILE]
    names = sorted(lay["files"])
    wanted = [f for f in names if any(t.name in lay["files"][f] and _overlap(lay["files"][f][t.name], t)
                                      for t in targets)]
    return wanted or names[:1]


def _overlap(rng: tuple[int, int], t: Slice) -> bool:
    return max(rng[0], t.start) < min(rng[1], t.end)


def check_files(path, lay: dict | None, files: dict[str, dict], model_groups: list[list[str]],
                numels: dict[str, int]) -> dict[str, dict[str, tuple[int, int]]]:
    """Checks each optimizer file read and the param groups against the model's; returns the
    ranges each file holds, {file: {name: (start, end)}}."""
    ranges = {}
    for fname, saved in files.items():
        where = path / fname
        if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
            raise CheckpointError(f"{where}: not an optimizer state (no 'state' or 'param_groups')")
        if not isinstance(saved["state"], dict) or not isinstance(saved["param_groups"], list) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"]):
            raise CheckpointError(f"{where}: malformed optimizer state (state must map param names to states, "
                                  "param_groups be a list of groups with 'params' lists)")
        if len(saved["param_groups"]) != len(model_groups):
            raise CheckpointError(f"{where}: {len(saved['param_groups'])} param groups, the optimizer has "
                                  f"{len(model_groups)}")
        if lay is None:  # one file holding whole params: its groups are the checkpoint's
            for gi, (group, want) in enumerate(zip(saved["param_groups"], model_groups)):
                _check_group(where, gi, group["params"], want)
            held = {name: (0, numels[name]) for g in saved["param_groups"] for name in g["params"]}
        else:
            held = lay["files"].get(fname, {})
            for gi, group in enumerate(saved["param_groups"]):
                if not set(group["params"]) <= set(held):
                    raise CheckpointError(f"{where}: param group {gi} lists params the manifest does not place in "
                                          f"this file: {sorted(set(group['params']) - set(held))[:5]}")
            slices = saved.get("slices")
            listed = {n: (0, numels.get(n, -1)) for g in saved["param_groups"] for n in g["params"]} \
                if slices is None else {str(n): tuple(r) for n, r in slices.items()}
            if {n: r for n, r in listed.items() if n in held} != held:
                raise CheckpointError(f"{where}: its param slices differ from those the manifest records for it")
        unknown = sorted(set(saved["state"]) - set(held))
        if unknown:
            raise CheckpointError(f"{where}: state for params the optimizer does not hold: {unknown[:5]}")
        ranges[fname] = held
    if lay is not None:
        for gi, (names, want) in enumerate(zip(lay["groups"], model_groups)):
            _check_group(path / "manifest.json", gi, names, want)
        if len(lay["groups"]) != len(model_groups):
            raise CheckpointError(f"{path / 'manifest.json'}: {len(lay['groups'])} param groups, the optimizer has "
                                  f"{len(model_groups)}")
    return ranges


def _check_group(where, gi: int, saved: list, want: list) -> None:
    if sorted(saved) != sorted(want):
        missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
        raise CheckpointError(f"{where}: param group {gi} does not match the model's trainable params "
                              f"(missing: {missing[:5]}, unexpected: {extra[:5]})")


@dataclass
class _Piece:
    file: str
    start: int  # the piece's elements in the param: [start, end)
    end: int
    state: dict | None
    maps: dict  # the file's quant_maps

    def cut(self, t: Slice) -> tuple[int, int]:
        """The elements of `t` in this piece, as offsets into the piece."""
        return max(self.start, t.start) - self.start, min(self.end, t.end) - self.start


def assemble(path, files: dict[str, dict], ranges: dict[str, dict[str, tuple[int, int]]],
             targets: list[Slice]) -> tuple[list, dict, list[dict]]:
    """(state per target, or None; the top-level keys of the optimizer's state dict; the
    settings of each param group, without params) from the files read."""
    states = []
    for t in targets:
        pieces = sorted((_Piece(f, a, b, files[f]["state"].get(t.name), files[f].get("quant_maps") or {})
                         for f, held in ranges.items() if t.name in held
                         for a, b in [held[t.name]] if max(a, t.start) < min(b, t.end)), key=lambda p: p.start)
        covered = t.start
        for p in pieces:
            covered = p.end if p.start <= covered else covered
        if not pieces or pieces[0].start > t.start or covered < t.end:
            raise CheckpointError(f"{path}: elements [{t.start}, {t.end}) of {t.name} are not all in the optimizer "
                                  f"files read ({sorted(ranges)})")
        states.append(_assemble(path, t, pieces))
    first = files[sorted(files)[0]]
    top = {k: v for k, v in first.items() if k not in ("state", "param_groups", "slices", "quant_maps")}
    maps = {}
    for f in sorted(files):
        maps.update(files[f].get("quant_maps") or {})
    if maps or "quant_maps" in first:
        top["quant_maps"] = maps
    groups = [{k: v for k, v in g.items() if k != "params"} for g in first["param_groups"]]
    return states, top, groups


def _assemble(path, t: Slice, pieces: list[_Piece]):
    n = t.end - t.start
    if len(pieces) == 1 and (pieces[0].start, pieces[0].end) == (t.start, t.end):
        return _reshaped(pieces[0].state, n, t.shape)  # as saved: the optimizer checks it
    with_state = [p for p in pieces if p.state]
    if not with_state:
        return None
    if len(with_state) != len(pieces):
        bare = next(p for p in pieces if not p.state)
        raise CheckpointError(f"{path}: {t.name} has optimizer state in {with_state[0].file} but none for elements "
                              f"[{bare.start}, {bare.end}) in {bare.file}")
    kinds = [_classify(path / p.file, t.name, p.state, p.end - p.start) for p in pieces]
    out = _agreed_scalars(path, t.name, pieces, kinds)
    formats = {(p.state.get("format", "fp32"), p.state.get("block_size")) for p in pieces}
    fmt, block = next(iter(formats))
    if len(formats) == 1 and fmt in FORMATS and _block_aligned(t, pieces):
        out.update(format=fmt, block_size=block)
        f = FORMATS[fmt]
        for key in _same_keys(path, t.name, pieces, kinds, "blocks"):
            parts = []
            for p in pieces:
                lo, hi = p.cut(t)
                value = p.state[key].reshape(-1)
                if key.endswith("_codes"):
                    parts.append(value[lo * f.bits // 8:f.code_bytes(hi, block)])
                else:
                    parts.append(value[lo // block:-(-hi // block)])
            out[key] = torch.cat(parts)
        for key in _same_keys(path, t.name, pieces, kinds, "elements"):
            out[key] = torch.cat([p.state[key].reshape(-1)[slice(*p.cut(t))] for p in pieces]).view(t.shape)
        return out
    # Per-element fp32: exact for fp32 pieces; quantized pieces are decoded (their blocks only).
    logical = [_elements(path / p.file, t, p, kind) for p, kind in zip(pieces, kinds)]
    keys = sorted(logical[0])
    for p, values in zip(pieces, logical):
        if sorted(values) != keys:
            raise CheckpointError(f"{path / p.file}: the state of {t.name} holds {sorted(values)}, another file's "
                                  f"piece of it holds {keys}")
    if any("format" in p.state for p in pieces):
        out["format"] = "fp32"
    for key in keys:
        out[key] = torch.cat([values[key] for values in logical]).view(t.shape)
    return out


def _classify(where, name: str, state: dict, m: int) -> dict[str, str]:
    """Each key of a piece's state: "meta" (format, block size), "blocks" (quantized codes and
    absmax), "elements" (one value per element of the piece) or "scalar"."""
    fmt = state.get("format", "fp32")
    quantized = fmt in FORMATS
    if "format" in state and fmt != "fp32" and not quantized:
        raise CheckpointError(f"{where}: the state of {name} has the unknown format {fmt!r}")
    kinds = {}
    for key, value in state.items():
        if key in _META:
            kinds[key] = "meta"
        elif quantized and key.endswith(("_codes", "_absmax")):
            kinds[key] = "blocks"
        elif isinstance(value, torch.Tensor) and key != "step" and value.numel() == m:
            kinds[key] = "elements"
        elif not isinstance(value, torch.Tensor) or value.numel() == 1:
            kinds[key] = "scalar"
        else:
            raise CheckpointError(f"{where}: state {key!r} of {name} has {value.numel()} elements, neither one per "
                                  f"element of its {m} nor a scalar, so it cannot be split or joined")
    if quantized:
        block = state.get("block_size")
        try:
            codec.check_block(block)
        except ValueError as err:
            raise CheckpointError(f"{where}: the state of {name}: {err}") from None
        f = FORMATS[fmt]
        for key, kind in kinds.items():
            if kind != "blocks":
                continue
            want = f.code_bytes(m, block) if key.endswith("_codes") else -(-m // block)
            if state[key].numel() != want:
                raise CheckpointError(f"{where}: state {key!r} of {name} has {state[key].numel()} values; {m} "
                                      f"elements in {fmt} blocks of {block} need {want}")
    return kinds


def _agreed_scalars(path, name: str, pieces: list[_Piece], kinds: list[dict]) -> dict:
    first = {k: v for k, v in pieces[0].state.items() if kinds[0][k] == "scalar"}
    for p, kind in zip(pieces[1:], kinds[1:]):
        mine = {k: v for k, v in p.state.items() if kind[k] == "scalar"}
        for key in sorted(set(first) | set(mine)):
            a, b = first.get(key), mine.get(key)
            same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and torch.equal(a, b)) or (not isinstance(a, torch.Tensor) and a == b)
            if not same:
                raise CheckpointError(f"{path}: {key!r} of {name} differs between {pieces[0].file} ({a!r}) and "
                                      f"{p.file} ({b!r})")
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.items()}


def _same_keys(path, name, pieces, kinds, kind: str) -> list[str]:
    keys = sorted(k for k, v in kinds[0].items() if v == kind)
    for p, other in zip(pieces[1:], kinds[1:]):
        if sorted(k for k, v in other.items() if v == kind) != keys:
            raise CheckpointError(f"{path / p.file}: the state of {name} holds other arrays than in "
                                  f"{pieces[0].file}")
    return keys


def _block_aligned(t: Slice, pieces: list[_Piece]) -> bool:
    """Whether the pieces' codes can be cut and joined by whole blocks into `t`'s."""
    block = pieces[0].state["block_size"]
    for i, p in enumerate(pieces):
        lo, hi = p.cut(t)
        last = i == len(pieces) - 1
        if lo % block or (hi % block and not (last and hi == p.end - p.start)):
            return False
    return True


def _elements(where, t: Slice, p: _Piece, kinds: dict) -> dict[str, torch.Tensor]:
    """Per-element fp32 values of `p`'s state over `t`'s elements (quantized moments decoded)."""
    lo, hi = p.cut(t)
    out = {key: p.state[key].reshape(-1)[lo:hi] for key, kind in kinds.items() if kind == "elements"}
    fmt = p.state.get("format", "fp32")
    if fmt in FORMATS:
        f, block = FORMATS[fmt], p.state["block_size"]
        first, last = lo // block, -(-hi // block)  # only the blocks holding [lo, hi)
        for key in kinds:
            if not key.endswith("_codes") or kinds[key] != "blocks":
                continue
            moment = key[:-len("_codes")]
            if moment not in _SIGNED or f"{moment}_absmax" not in p.state:
                raise CheckpointError(f"{where}: quantized state {key!r} of {t.name} is not a known moment (with "
                                      "its absmax)")
            signed = _SIGNED[moment]
            code_map = p.maps.get(fmt, {}).get("signed" if signed else "unsigned")
            codes = p.state[key].reshape(-1)[first * block * f.bits // 8:last * block * f.bits // 8]
            absmax = p.state[f"{moment}_absmax"].reshape(-1)[first:last].float()
            values = codec.dequantize_blockwise(codes, absmax, f, signed, block, (last - first) * block, code_map)
            out[moment] = values[lo - first * block:hi - first * block]
    return out


def _reshaped(state, n: int, shape: tuple):
    """`state` with its per-element tensors in `shape` (a whole param saved in its own shape,
    loaded as a flat shard, or the reverse)."""
    if not state:
        return state
    quantized = state.get("format", "fp32") in FORMATS
    out = dict(state)
    for key, value in state.items():
        if (isinstance(value, torch.Tensor) and key != "step" and value.numel() == n and tuple(value.shape) != shape
                and not (quantized and key.endswith(("_codes", "_absmax")))):
            out[key] = value.reshape(shape)
    return out
