"""Data-parallel partition of the optimizer state across ranks (ZeRO stage 1/2 style).

[Note: partitioned state] Every rank holds the whole model and computes grads on its own
micro-batches. At an accumulation boundary the grads are all-reduced (averaged, in fp32) so
every rank holds the same full grads. Each rank then updates only its partition, contiguous
element ranges of the flattened trainable params, through its own optimizer: its own pages,
page scheduler and NVMe file. Optimizer state in host RAM or on disk is therefore 1/world of
the total per rank. The updated slices are then all-gathered, and every rank again holds
the same params.

The optimizer's params are *shards*: leaf tensors that alias a slice of a model param's
storage (``p.view(-1)[a:b]``), so an update writes the model param directly, and a shard's
grad is a view of the reduced full grad. Partition boundaries fall on multiples of ALIGN
elements within a param. That is 4096, the largest quantization block, so a shard's
quantization blocks are the whole param's blocks. Each shard records its param's size, on
which the optimizer decides min_8bit_size, so all shards of a param have its state format.

Every rank computes the same partition from the same param list; nothing is negotiated.
A checkpoint records the split, and each rank's state is written with the element ranges it
covers, so it reloads at any world size ([Note: world-size-free checkpoints] in reshard.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..optim.sharded import mark_full_numel

ALIGN = 4096
_BUCKET_ELEMENTS = 16 << 20  # fp32 elements per all-reduce bucket (64 MiB)


def split_points(numels: list[int], world: int, align: int = ALIGN) -> list[int]:
    """world + 1 increasing offsets into the concatenated flat params: rank r owns
    [points[r], points[r + 1]). Each inner boundary is the even split point moved to the
    nearest multiple of `align` from the start of the param it falls in (or that param's end)."""
    total = sum(numels)
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    points = [0]
    for r in range(1, world):
        target = round(total * r / world)
        i = max(j for j in range(len(numels)) if starts[j] <= target) if numels else 0
        i = min(i, len(numels) - 1)
        offset = min(numels[i], round((target - starts[i]) / align) * align)
        points.append(max(points[-1], starts[i] + offset))
    points.append(total)
    return points


class Partition:
    """This rank's share of `params` (the trainable params, in a fixed order shared by every
    rank) and the collectives around its optimizer step."""

    def __init__(self, params: list[torch.Tensor], group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f"data-parallel partition: a param of shape {list(p.shape)} is not contiguous")
        self.params = list(params)
        self._device = self.params[0].device if self.params else torch.device("cpu")
        numels = [p.numel() for p in self.params]
        self.points = split_points(numels, self.world)
        lo, hi = self.points[self.rank], self.points[self.rank + 1]
        self.owned: list[tuple[torch.Tensor, int, int]] = []  # (param, start, end) within the flat param
        self.shard_of: dict[torch.Tensor, torch.nn.Parameter] = {}
        self.range_of: dict[torch.Tensor, tuple[torch.Tensor, int, int]] = {}  # shard -> (param, start, end)
        self.groups: list[list[torch.Tensor]] = [self.params]  # the full params per optimizer group (shard_groups)
        start = 0
        for p, n in zip(self.params, numels):
            a, b = max(lo, start) - start, min(hi, start + n) - start
            if a < b:
                shard = torch.nn.Parameter(p.detach().view(-1)[a:b], requires_grad=p.requires_grad)
                # min_8bit_size is decided on the whole param, so a param's shards share one format.
                mark_full_numel(shard, n)
                self.owned.append((p, a, b))
                self.shard_of[p] = shard
                self.range_of[shard] = (p, a, b)
            start += n

    # ---- the optimizer's view ------------------------------------------------------------------
    def shard_groups(self, groups: list[dict]) -> list[dict]:
        """`groups` (param groups over the full params) with each param replaced by this rank's
        shard of it; params this rank owns nothing of are left out, groups are kept (possibly
        empty) so group indices, and the lr schedule, are the same on every rank."""
        self.groups = [list(g["params"]) for g in groups]
        return [{**g, "params": [self.shard_of[p] for p in g["params"] if p in self.shard_of]} for g in groups]

    @property
    def shards(self) -> list[torch.nn.Parameter]:
        return list(self.shard_of.values())

    def full_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    # ---- the collectives -----------------------------------------------------------------------
    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Averages the grads over the ranks (in fp32) and points each shard's grad at its slice.
        A param with no grad on any rank keeps none, as it would in one process."""
        # On the params' device: NCCL reduces CUDA tensors only (gloo takes either).
        has = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32, device=self._device)
        # Why: ranks must agree on which params carry a grad before the flat buckets are built,
        # or their buckets would differ in layout; SUM > 0 means some rank has one.
        dist.all_reduce(has, op=dist.ReduceOp.SUM, group=self.group)
        with_grad = [p for p, h in zip(self.params, has.tolist()) if h > 0]
        for p in with_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(with_grad):
            flat = torch.cat([p.grad.reshape(-1).float() for p in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat /= self.world
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        for p, a, b in self.owned:
            self.shard_of[p].grad = p.grad.view(-1)[a:b] if p.grad is not None else None

    @torch.no_grad()
    def agree_on(self, norm: torch.Tensor) -> torch.Tensor:
        """The same grad norm on every rank. The reduced grads are identical everywhere, so the
        norms already are; the MAX makes the skip/clip decision provably shared (a non-finite
        norm on any rank is non-finite on all), at the cost of one scalar collective."""
        agreed = norm.detach().to(torch.float32).reshape(1).clone()
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
        return agreed[0]

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every rank's updated slices to every rank, per param dtype, padded to the longest
        partition so the all_gather buffers have one size."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            device = params[0].device
            spans = [self._spans(params, r) for r in range(self.world)]
            longest = max(sum(b - a for _, a, b in s) for s in spans)
            if longest == 0:
                continue
            mine = torch.zeros(longest, dtype=dtype, device=device)
            offset = 0
            for p, a, b in spans[self.rank]:
                mine[offset:offset + b - a] = p.view(-1)[a:b]
                offset += b - a
            gathered = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(gathered, mine, group=self.group)
            for r, span in enumerate(spans):
                if r == self.rank:
                    continue
                offset = 0
                for p, a, b in span:
                    p.view(-1)[a:b] = gathered[r][offset:offset + b - a]
                    offset += b - a

    def _spans(self, params: list[torch.Tensor], rank: int) -> list[tuple[torch.Tensor, int, int]]:
        """(param, start, end) of `rank`'s partition among `params`."""
        lo, hi = self.points[rank], self.points[rank + 1]
        out, start = [], 0
        wanted = {id(p) for p in params}
        for p in self.params:
            n = p.numel()
            a, b = max(lo, start) - start, min(hi, start + n) - start
            if a < b and id(p) in wanted:
                out.append((p, a, b))
            start += n
        return out

    def spans(self, rank: int) -> list[tuple[torch.Tensor, int, int]]:
        """(param, start, end) of every param slice `rank` owns, in the flat order."""
        return self._spans(self.params, rank)

    # ---- agreement outside the step (checkpoints) ------------------------------------------------
    def all_gather_object(self, obj) -> list:
        """Every rank's `obj` (small, picklable), in rank order, on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, fn, what: str, error=RuntimeError, share: bool = False):
        """Runs ``fn()`` on this rank, then every rank learns whether all succeeded, so no rank
        goes on (or waits in a later collective) after another failed. A rank whose ``fn``
        raised re-raises its own error; the others raise `error` naming that rank. Returns
        ``fn()``'s result, or with `share` every rank's results (small, picklable) in rank order."""
        try:
            result, failure = fn(), None
        except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised
            result, failure = None, err
        report = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = self.all_gather_object((result if share else None, report))
        if failure is not None:
            raise failure
        failed = [(r, msg) for r, (_, msg) in enumerate(reports) if msg is not None]
        if failed:
            r, msg = failed[0]
            more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
            raise error(f"{what}: rank {r} of {self.world} failed{more}: {msg}")
        return [res for res, _ in reports] if share else result

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _buckets(params: list[torch.Tensor]):
    bucket, size = [], 0
    for p in params:
        if bucket and size + p.numel() > _BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
