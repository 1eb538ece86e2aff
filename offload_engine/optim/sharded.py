"""Params sharded across ranks, as the drop-in optimizers meet them: FSDP2 (``fully_shard``:
each param a DTensor), FSDP1 (``FullyShardedDataParallel``: flat params, or with
``use_orig_params=True`` each original param a flattened piece of its rank's shard) and the
engine's own data-parallel shards (engine/partition.py).

[Note: sharded params] Each rank updates and pages only its local shard: the kernels get
``local(param)`` and ``local(grad)`` (a DTensor's ``to_local()``, which aliases the param's
storage, so an in-place update is the param's update), the state arrays have the local
shard's shape, and pages hold local elements only. Quantization blocks therefore start at the
local shard's first element.

Decisions that change numbers are taken on the whole param, so every rank takes the same one
and it does not change with the world size: ``min_8bit_size`` compares the *full* param's
element count (full_numel). A DTensor knows its global shape; an FSDP1 flat param records
its unsharded size; the engine marks its shards (mark_full_numel). FSDP1's original params
(``use_orig_params=True``) show only their flattened piece, so record_full_sizes(model) must
record their sizes before a quantized optimizer with ``min_8bit_size > 0`` is built over them.

[Note: sharded state dict] For DTensor and FSDP1 params, ``state_dict()`` presents each param's
state as torch.optim.AdamW's would be under FSDP: ``step`` (a scalar tensor) and fp32
``exp_avg``/``exp_avg_sq`` (and ``master``) with the param's sharding: DTensors placed like
the param (FSDP2), or the local shard's tensors (FSDP1, whose own optim_state_dict gathers and
reshards them); ``format`` is "fp32", the encoding of those tensors. 8-/4-bit state is
decoded to fp32 there, because its blocks start at each rank's shard boundary: codes and
absmax cannot be cut and rejoined at another world size, the per-element values can.
``load_state_dict`` encodes them into the loading optimizer's blocks (codec.encode_decoded), so
torch.distributed.checkpoint can save, reshard and load the state like torch.optim's; fp32
state reloads exactly at any world size, quantized state exactly wherever the loading blocks
are the saving ones (same world size and block size, or shard boundaries on block boundaries)
and within one re-quantization elsewhere. The state in memory stays 8-bit; only the state_dict holds fp32.
"""
from __future__ import annotations

import torch

try:  # builds of torch without torch.distributed have no DTensor (and no FSDP)
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = distribute_tensor = None
else:
    # [Note: import torch.distributed.nn early] torch.distributed.nn.functional binds
    # ``group.WORLD`` as a default argument of its functions when it is first imported, and
    # torch.optim.Optimizer's constructor imports torch._dynamo, which imports it. Imported
    # after init_process_group (a script that starts its group, then builds its first
    # optimizer), it holds the default group for good: destroy_process_group cannot free it,
    # and its gloo threads and TCPStore server run until the process exits, as if the group
    # had never been destroyed (which can abort at exit with "terminate called without an
    # active exception"). Imported here, with the optimizers, before the script starts its
    # group, it binds None instead.
    import torch.distributed.nn.functional  # noqa: F401

FULL_NUMEL_ATTR = "_offload_engine_full_numel"
_FSDP1_FLATTENED = "_fsdp_flattened"           # FSDP1 marks the params it flattened
_FSDP1_UNSHARDED = "_unpadded_unsharded_size"  # an FSDP1 FlatParameter's size before sharding


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a param or grad: a DTensor's local shard (an alias of its
    storage), any other tensor itself."""
    if is_dtensor(t):
        with torch.no_grad():  # no autograd node: an alias the kernels may update in place
            return t.to_local()
    return t


def local_numel(t: torch.Tensor) -> int:
    return local(t).numel()


def is_fsdp1(p: torch.Tensor) -> bool:
    return bool(getattr(p, _FSDP1_FLATTENED, False))


def presents_logical(p: torch.Tensor) -> bool:
    """Whether state_dict() shows `p`'s state as fp32 tensors sharded like `p` ([Note:
    sharded state dict]) rather than in the optimizer's own format."""
    return is_dtensor(p) or is_fsdp1(p)


def mark_full_numel(t: torch.Tensor, numel: int) -> torch.Tensor:
    """Records that `t` is a shard of a param of `numel` elements ([Note: sharded params])."""
    setattr(t, FULL_NUMEL_ATTR, int(numel))
    return t


def full_numel(p: torch.Tensor) -> int | None:
    """The element count of the whole param `p` is (a shard of); None when `p` is an FSDP1
    original param whose size was not recorded (record_full_sizes)."""
    recorded = getattr(p, FULL_NUMEL_ATTR, None)
    if recorded is not None:
        return recorded
    if is_dtensor(p):
        return p.numel()  # a DTensor's shape is the global one
    unsharded = getattr(p, _FSDP1_UNSHARDED, None)
    if unsharded is not None:
        return unsharded.numel()  # an FSDP1 FlatParameter
    if is_fsdp1(p):
        return None
    return p.numel()


def record_full_sizes(model: torch.nn.Module) -> None:
    """Records the full element count of every param of `model` for the quantized optimizers'
    ``min_8bit_size`` ([Note: sharded params]). Needed only for FSDP1 with
    ``use_orig_params=True``; call it on the model before or after wrapping, before building
    the optimizer. Params not yet flattened record their own size; flattened ones take it from
    their FSDP1 module's flat param."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"record_full_sizes: model must be a torch.nn.Module, got {type(model).__name__}")
    flattened = []
    for p in model.parameters():
        if is_fsdp1(p):
            flattened.append(p)
        elif getattr(p, _FSDP1_UNSHARDED, None) is None:
            mark_full_numel(p, p.numel())  # a DTensor's numel is the global one
    if not flattened:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    for module in FSDP.fsdp_modules(model):
        flat = getattr(getattr(module, "_handle", None), "flat_param", None)
        originals, shapes = getattr(flat, "_params", None), getattr(flat, "_shapes", None)
        if originals is None or shapes is None:
            continue  # use_orig_params=False: the optimizer sees the flat param itself
        for p, shape in zip(originals, shapes):
            mark_full_numel(p, torch.Size(shape).numel())
    missing = [p for p in flattened if full_numel(p) is None]
    if missing:
        raise RuntimeError(f"record_full_sizes: {len(missing)} params flattened by FSDP1 were not found in its flat "
                           "params (this torch's FSDP1 internals differ); call record_full_sizes(model) before "
                           "wrapping the model instead")


# ---- the state dict's tensors -----------------------------------------------------------------
def present(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A local state array shaped like local(p), as the state_dict shows it: a DTensor with
    `p`'s mesh, placements, shape and stride when `p` is a DTensor ([Note: sharded state dict])."""
    if not is_dtensor(p):
        return value
    return DTensor.from_local(value.view(local(p).shape), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def localize(value: torch.Tensor, p: torch.Tensor, where: str) -> torch.Tensor:
    """A loaded param-shaped state tensor as the local shard of the DTensor param `p`: a
    DTensor is redistributed to `p`'s placements if needed; a plain tensor must have `p`'s
    global shape (a state saved without sharding), and each rank takes its shard of it."""
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"{where}: has shape {list(value.shape)}, the param's (global) shape is {list(p.shape)}")
    with torch.no_grad():
        if is_dtensor(value):
            if value.device_mesh != p.device_mesh:
                raise ValueError(f"{where}: is a DTensor on {value.device_mesh}, the param is on {p.device_mesh}")
            if tuple(value.placements) != tuple(p.placements):
                value = value.redistribute(p.device_mesh, p.placements)
            return value.to_local()
        # Every rank holds the whole tensor: each keeps its own shard, no communication.
        return distribute_tensor(value.to(local(p).device), p.device_mesh, p.placements,
                                 src_data_rank=None).to_local()
