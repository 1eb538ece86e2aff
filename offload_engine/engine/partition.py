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

[Note: collective buffers] The collectives run on flat scratch buffers, one per use and
dtype, allocated once and reused by every chunk of every step: on gloo the send and receive
chunks of the reduction to owners (16 MiB each, and an fp32 accumulator for bf16/fp16 grads)
and the chunks of the param broadcasts (up to 64 MiB); otherwise the all-reduce bucket (up to
64 MiB). A fresh buffer of tens of MiB is a fresh mmap, and touching it page by page cost as
much as the collective itself (a 33 MiB torch.cat took 25-38 ms where a copy into an existing
buffer took 3-7 ms, 2 ranks of gloo on 2 cores). Chunks and buckets have a fixed maximum, so
the buffers do not grow with the model.

[Note: gather by broadcast] gloo's all_gather is slower than one broadcast per rank from a
packed buffer: 51-64 ms against 17-19 ms to exchange 2 x 16 MiB between 2 CPU ranks (it
copies every input and output through staging buffers of its own). So on gloo each rank
broadcasts its own slices, packed chunk by chunk; other backends (NCCL) keep all_gather,
their fast collective.

[Note: reduce to owners] A rank updates only its own slices, so it needs only their grads
averaged, not every grad: on gloo, reduce_grads sends each owner this rank's grads of the
owner's slices and sums those it receives of its own (a reduce-scatter from pairs of
isend/irecv), half the bytes of an all-reduce (2 x 16 MiB in 15-18 ms against 29-41 ms for
the all-reduce of 33 MiB, 2 CPU ranks). gloo's own reduce_scatter is slower than its
all-reduce. The global grad norm is then the shards' norms combined (grad_norm). NCCL keeps
the all-reduce. With 2 ranks the sum of the two grads is the all-reduce's, bit for bit.

[Note: shared params] When the ranks share a host (gloo, CPU params; shared_memory.py), the
trainable params move into one shared-memory file: every rank's model points at the same
bytes, so an owner's update is every rank's, and gather_params is a barrier. The grads go to
their owners through per-rank outboxes in the same file (pack, barrier, the owner adds its
peers' outboxes into its own grads), so no grad or param crosses gloo; a step's collectives
are the flag all-reduce, one barrier each side of the update, and the norm's all-reduce.
Ordering, by barrier: an owner reads the outboxes only after every rank wrote its own
(after its backward: no rank still reads the params the update will write); a rank writes
its outbox again only after the next step's flag all-reduce, which no rank passes before every
owner has finished reading; the next forward starts after gather_params' barrier, when every
owner has written its slices. Rank 0's params become every rank's at setup (DeepSpeed
broadcasts rank 0's at initialize too). The node then holds one copy of the params instead of
one per rank. Ranks on several hosts, each with several ranks, share params within each host
and exchange across hosts by column ([Note: hierarchical exchange] in host_exchange.py). Any
failure to set it up (hosts with unequal rank counts or one rank each, a small /dev/shm, params
that share storage with other tensors) leaves the gloo path above, with the reason logged.

[Note: reduce per bucket] in bucket_exchange.py: with paging.overlap "exact" the grads go to their
owners a bucket at a time during backward (the methods of BucketExchange, mixed in here).

Every rank computes the same partition from the same param list; nothing is negotiated.
A checkpoint records the split, and each rank's state is written with the element ranges it
covers, so it reloads at any world size ([Note: world-size-free checkpoints] in reshard.py).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..optim.sharded import mark_full_numel
from .bucket_exchange import BucketExchange
from .host_exchange import HostExchange
from .shared_memory import SharedArena, aligned, host_ids
from .spans import add_into, pack, sub_span, unpack

log = logging.getLogger(__name__)

ALIGN = 4096
_BUCKET_ELEMENTS = 16 << 20  # fp32 elements per all-reduce bucket or broadcast chunk (64 MiB)
_CHUNK_ELEMENTS = 4 << 20  # fp32 elements per chunk of the reduction to owners (16 MiB per buffer, 3 buffers)
_PIECE_ELEMENTS = 1 << 18  # an owner sums its peers' outboxes 1 MiB of fp32 at a time: the divide finds it in cache


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


class Partition(BucketExchange, HostExchange):
    """This rank's share of `params` (the trainable params, in a fixed order shared by every
    rank) and the collectives around its optimizer step."""

    def __init__(self, params: list[torch.Tensor], group=None, shared_memory: bool = True):
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
        # Every rank's slices, fixed for the partition's life: the collectives walk them each step.
        self._spans_by_rank = [self._spans(self.params, r) for r in range(self.world)]
        lo, hi = self.points[self.rank], self.points[self.rank + 1]
        self.owned: list[tuple[torch.Tensor, int, int]] = []  # (param, start, end) within the flat param
        self.shard_of: dict[torch.Tensor, torch.nn.Parameter] = {}
        self.range_of: dict[torch.Tensor, tuple[torch.Tensor, int, int]] = {}  # shard -> (param, start, end)
        self.groups: list[list[torch.Tensor]] = [self.params]  # the full params per optimizer group (shard_groups)
        self.any_grad = False  # whether some rank had a grad at the last reduce_grads
        self._scratch_of: dict = {}  # (use, dtype) -> a reused flat buffer ([Note: collective buffers])
        # ([Note: shared params]) before the shards are cut: they must alias the shared params.
        self._outbox: list[dict[int, torch.Tensor]] = []  # [rank][owner] -> fp32 grads for owner
        self._outbox_pos: dict[tuple[int, int], int] = {}  # (owner, id(param)) -> its slice's offset in a box
        self._column_pos: dict[tuple[int, int], int] = {}  # the same in a column's box, less its start in the param
        self.transport = dist.get_backend(group)  # "gloo", "nccl", ..., "shared memory" or "hierarchical"
        if shared_memory and self.transport == "gloo" and self.params:
            self._share_params()
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

    # ---- same-host shared memory ([Note: shared params]) ---------------------------------------
    def _share_params(self) -> None:
        """Moves the params into a shared-memory arena and lays out the grad outboxes there;
        leaves everything as it was (and says why) when that cannot be done. A collective."""
        why = ""
        if any(p.device.type != "cpu" for p in self.params):
            why = "the params are not all in CPU memory"
        elif any(p.untyped_storage().nbytes() != p.numel() * p.element_size() or p.storage_offset()
                 for p in self.params):
            why = "a param shares its storage with another tensor (moving it would break the aliasing)"
        if why:  # the same on every rank: the same model and group
            log.info("data parallel: %s; grads and params go through gloo", why)
            return
        ids = host_ids(self.group)
        if None in ids:
            log.info("data parallel: a rank's host has no boot id; grads and params go through gloo")
            return
        if any(i != ids[0] for i in ids):
            why = self._share_across_hosts(ids)  # [Note: hierarchical exchange]
            if why:
                log.info("data parallel: the ranks are on several hosts and %s; grads and params go through gloo",
                         why)
            return
        offset, param_at = 0, []
        for p in self.params:
            param_at.append(offset)
            offset += aligned(p.numel() * p.element_size())
        sizes = [sum(b - a for _, a, b in self.spans(r)) for r in range(self.world)]
        outbox_at = {}
        for r in range(self.world):
            for o in range(self.world):
                if o != r:
                    outbox_at[(r, o)] = offset
                    offset += aligned(sizes[o] * 4)
        arena, why = SharedArena.create(offset, self.group)
        if arena is None:
            log.warning("data parallel: no shared memory for the ranks of this host (%s); grads and params go "
                        "through gloo", why)
            return
        shared = [arena.region(at, p.numel(), p.dtype) for p, at in zip(self.params, param_at)]
        if self.rank == 0:
            for p, flat in zip(self.params, shared):
                flat.copy_(p.detach().reshape(-1))
        # Why: rank 0's values are in the arena before any rank points its params at them.
        dist.barrier(group=self.group)
        for p, flat in zip(self.params, shared):
            p.data = flat.view(p.shape)
        self._outbox = [{o: arena.region(outbox_at[(r, o)], sizes[o], torch.float32)
                         for o in range(self.world) if o != r} for r in range(self.world)]
        for o in range(self.world):  # where each of owner o's slices sits in an outbox for o
            pos = 0
            for q, a, b in self.spans(o):
                self._outbox_pos[(o, id(q))] = pos
                pos += b - a
        self.transport = "shared memory"
        log.info("data parallel: the %d ranks of this host share params and exchange grads in shared memory "
                 "(%.0f MiB)", self.world, offset / 2**20)

    def _reduce_through_shared(self, with_grad: list[torch.Tensor]) -> None:
        """The averaged grads of this rank's slices, from its peers' outboxes ([Note: shared params])."""
        has = set(with_grad)
        rank, world = self.rank, self.world
        for owner, box in self._outbox[rank].items():  # this rank's grads of the others' slices
            pos = 0
            for p, a, b in self.spans(owner):
                if p in has:
                    box[pos:pos + b - a] = p.grad.view(-1)[a:b]
                pos += b - a
        # Why: every rank's outbox holds this step's grads before any owner reads one.
        dist.barrier(group=self.group)
        peers = [self._outbox[r][rank] for r in range(world) if r != rank]
        pos = 0
        for p, a, b in self.spans(rank):
            if p in has:
                self._average_from_boxes(p.grad.view(-1), a, b, pos, peers, "acc")
            pos += b - a

    def _average_from_boxes(self, flat: torch.Tensor, a: int, b: int, at: int, boxes: list, use: str) -> None:
        """flat[a:b] (this rank's grads of a slice) plus the slice of each of `boxes` (peers'
        outboxes, where it starts at `at`), in their order, divided by the world; 1 MiB of
        fp32 at a time, so the divide finds it in cache."""
        for x in range(a, b, _PIECE_ELEMENTS):
            y = min(b, x + _PIECE_ELEMENTS)
            pos = at + x - a
            # fp32 grads sum in place; others (bf16, fp16) in fp32, rounded back once.
            acc = flat[x:y] if flat.dtype == torch.float32 else \
                self._scratch(use, y - x, torch.float32).copy_(flat[x:y])
            for box in boxes:
                acc += box[pos:pos + y - x]
            acc /= self.world
            if flat.dtype != torch.float32:
                flat[x:y] = acc

    # ---- the collectives -----------------------------------------------------------------------
    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Averages the grads over the ranks (in fp32) and points each shard's grad at its slice.
        On gloo only the slices this rank owns are reduced ([Note: reduce to owners]); the rest
        of its full grads keep its own micro-batch's values. A param with no grad on any rank
        keeps none, as it would in one process."""
        # On the params' device: NCCL reduces CUDA tensors only (gloo takes either).
        has = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32, device=self._device)
        # Why: ranks must agree on which params carry a grad before the flat buckets are built,
        # or their buckets would differ in layout; SUM > 0 means some rank has one.
        dist.all_reduce(has, op=dist.ReduceOp.SUM, group=self.group)
        with_grad = [p for p, h in zip(self.params, has.tolist()) if h > 0]
        self.any_grad = bool(with_grad)
        for p in with_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.transport == "shared memory":
            self._reduce_through_shared(with_grad)
        elif self.transport == "hierarchical":
            self._reduce_hierarchical(with_grad, _CHUNK_ELEMENTS)
        elif self.transport == "gloo":
            self._reduce_to_owners(with_grad)
        else:
            self._all_reduce(with_grad)
        for p, a, b in self.owned:
            self.shard_of[p].grad = p.grad.view(-1)[a:b] if p.grad is not None else None

    def _all_reduce(self, with_grad: list[torch.Tensor]) -> None:
        """Every rank gets the averaged grads of every param, a bucket at a time."""
        for bucket in _buckets(with_grad):
            flat = self._scratch("reduce", sum(p.numel() for p in bucket), torch.float32)
            torch.cat([p.grad.reshape(-1).float() for p in bucket], out=flat)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat /= self.world
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def _reduce_to_owners(self, with_grad: list[torch.Tensor]) -> None:
        """Each rank gets the averaged grads of its own slices only ([Note: reduce to owners]):
        in round k it sends its grads of rank r+k's slices to r+k and adds those rank r-k sends
        of its own, a chunk of at most _CHUNK_ELEMENTS at a time, summing in fp32."""
        has = set(with_grad)
        spans = [[(p.grad, a, b) for p, a, b in self.spans(r) if p in has] for r in range(self.world)]
        sizes = [sum(b - a for _, a, b in s) for s in spans]
        rank, world = self.rank, self.world
        for lo in range(0, max(sizes), _CHUNK_ELEMENTS):
            mine = sub_span(spans[rank], lo, min(sizes[rank], lo + _CHUNK_ELEMENTS))
            n_mine = sum(b - a for _, a, b in mine)
            # fp32 grads sum in place; others (bf16, fp16) in an fp32 copy, rounded back at the end.
            in_place = all(g.dtype == torch.float32 for g, _, _ in mine)
            if not in_place:
                acc = self._scratch("acc", n_mine, torch.float32)
                pack(mine, acc)
            for k in range(1, world):
                to, frm = (rank + k) % world, (rank - k) % world
                theirs = sub_span(spans[to], lo, min(sizes[to], lo + _CHUNK_ELEMENTS))
                n_theirs = sum(b - a for _, a, b in theirs)
                # Both sides of a pair agree on every size (the same partition), so each isend
                # meets its irecv; posting both before waiting lets the two directions overlap.
                requests = []
                if n_theirs:
                    out = self._scratch("send", n_theirs, torch.float32)
                    pack(theirs, out)
                    requests.append(dist.isend(out, dst=self._global(to), group=self.group))
                if n_mine:
                    into = self._scratch("recv", n_mine, torch.float32)
                    requests.append(dist.irecv(into, src=self._global(frm), group=self.group))
                for request in requests:
                    request.wait()
                if n_mine and in_place:
                    add_into(mine, into)
                elif n_mine:
                    acc += into
            if n_mine and in_place:
                for g, a, b in mine:
                    g.view(-1)[a:b].div_(world)
            elif n_mine:
                acc /= world
                unpack(acc, mine)

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    @torch.no_grad()
    def grad_norm(self, norm_of) -> torch.Tensor:
        """The global 2-norm of the reduced grads, the same on every rank: `norm_of` (the
        engine's norm of a list of grads) over this rank's shards, squared, summed over the
        ranks. A non-finite grad on any rank makes it non-finite on all, so every rank takes
        the same skip/clip decision."""
        grads = [s.grad for s in self.shards if s.grad is not None]
        local = norm_of(grads) if grads else torch.zeros((), device=self._device)
        squared = local.detach().to(device=self._device, dtype=torch.float32).reshape(1) ** 2
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self.group)
        return squared.sqrt()[0]

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every rank's updated slices to every rank, per param dtype: on gloo by broadcasts
        from each owner ([Note: gather by broadcast]), else by all_gather into buffers padded
        to the longest partition. With shared params there is nothing to move: a barrier."""
        if self.transport == "shared memory":
            # Why: every owner has written its slices into the shared params before any rank
            # returns to run the next forward on them ([Note: shared params]).
            dist.barrier(group=self.group)
            return
        if self.transport == "hierarchical":
            self._gather_across_hosts(_BUCKET_ELEMENTS)
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            spans = [self._spans(params, r) for r in range(self.world)]
            if self.transport == "gloo":
                self._broadcast_spans(spans, dtype)
                continue
            device = params[0].device
            longest = max(sum(b - a for _, a, b in s) for s in spans)
            if longest == 0:
                continue
            mine = torch.zeros(longest, dtype=dtype, device=device)
            pack(spans[self.rank], mine)
            gathered = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(gathered, mine, group=self.group)
            for r, span in enumerate(spans):
                if r != self.rank:
                    unpack(gathered[r], span)

    def _broadcast_spans(self, spans: list, dtype: torch.dtype) -> None:
        """Each rank's `spans[r]` from rank r to all, packed into the scratch buffer a chunk of
        at most _BUCKET_ELEMENTS at a time."""
        for r, span in enumerate(spans):
            src = self._global(r)
            size = sum(b - a for _, a, b in span)
            for lo in range(0, size, _BUCKET_ELEMENTS):
                hi = min(size, lo + _BUCKET_ELEMENTS)
                chunk, part = self._scratch("gather", hi - lo, dtype), sub_span(span, lo, hi)
                if r == self.rank:
                    pack(part, chunk)
                dist.broadcast(chunk, src=src, group=self.group)
                if r != self.rank:
                    unpack(chunk, part)

    def _scratch(self, use: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of the flat buffer for `use` and `dtype`, which grows to the largest
        size asked for and is reused after ([Note: collective buffers])."""
        buf = self._scratch_of.get((use, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._scratch_of[(use, dtype)] = torch.empty(numel, dtype=dtype, device=self._device)
        return buf[:numel]

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
        return self._spans_by_rank[rank]

    def barrier(self) -> None:
        """Returns once every rank has called it."""
        dist.barrier(group=self.group)

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
