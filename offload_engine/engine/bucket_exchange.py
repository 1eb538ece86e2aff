"""BucketExchange: the data-parallel partition's exchange of grads during backward, one bucket
at a time (mixed into Partition, partition.py, whose buffers, spans and outboxes it uses).

[Note: reduce per bucket] With paging.overlap "exact" an owner updates its pages during
backward, so its slices' grads must be averaged as backward produces them, not after. The
params are cut into buckets of whole params in backward order (the flat order reversed:
buckets(max_elements)); bucket_reduce.py exchanges a bucket on a thread of its own as soon as
every param in it has its grad final on this rank, and reduce_bucket sends each owner this
rank's grads of the owner's slices in the bucket, followed by one flag per slice (whether
this rank had a grad there at all). An owner adds what it receives in the order
_reduce_to_owners adds its chunks (its own grad, then rank r-1's, r-2's, ...), in fp32, then
divides by the world: bit for bit the grads of reduce_grads. A slice no rank had a grad of
keeps none, as in one process. With shared params ([Note: shared params] in partition.py) the
grads go
through the outboxes instead, and only the flags travel over gloo, after the outbox writes:
they tell the owner that a peer's part of the bucket is there to read, so no barrier per
bucket is needed; the owner sums in _reduce_through_shared's order (its own, then the peers'
in rank order). An owner then updates the shared params during the other ranks' backward,
which is safe: a bucket goes only once every rank's grads of it are final, and a param's
grad is final once every autograd node that reads the param has run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class BucketExchange:
    """Partition's methods for the exchange during backward ([Note: reduce per bucket])."""

    def buckets(self, max_elements: int) -> list[list[torch.Tensor]]:
        """The params in backward order (the flat order reversed), cut into buckets of whole
        params of at most `max_elements` elements (a larger param is a bucket of its own)."""
        out, size = [], 0
        for p in reversed(self.params):
            if not out or size + p.numel() > max_elements:
                out.append([])
                size = 0
            out[-1].append(p)
            size += p.numel()
        return out

    def side_group(self):
        """A gloo group of this partition's ranks for the bucket exchange: it runs on another
        thread while this partition's own group may carry other collectives. A collective."""
        return dist.new_group(ranks=[self._global(r) for r in range(self.world)], backend="gloo")

    @torch.no_grad()
    def reduce_bucket(self, params: list[torch.Tensor], group) -> list[torch.nn.Parameter]:
        """Averages the grads of this rank's slices of `params` (one of buckets(), whole params)
        over the ranks through `group` (side_group()); every rank calls it for the same bucket
        in the same order. Returns this rank's shards of the bucket that got a grad, each
        pointing at its averaged slice. The other slices of this rank's grads keep its own
        values; a param with no grad here but one on another rank gets a zero grad first
        ([Note: reduce per bucket])."""
        rank, world = self.rank, self.world
        wanted = {id(p) for p in params}
        spans = [[s for s in self.spans(r) if id(s[0]) in wanted] for r in range(world)]
        mine = spans[rank]
        if self.transport == "shared memory":
            return self._reduce_bucket_shared(spans, group)
        if self.transport == "hierarchical":  # [Note: hierarchical exchange] in host_exchange.py
            done = self._reduce_across_hosts(spans, group, "bucket")
            for p, a, b in done:
                self.shard_of[p].grad = p.grad.view(-1)[a:b]
            return [self.shard_of[p] for p, _, _ in done]
        n_mine = sum(b - a for _, a, b in mine)
        requests, received = [], []
        for k in range(1, world):
            to, frm = (rank + k) % world, (rank - k) % world
            theirs = spans[to]
            if theirs:
                out = self._scratch(f"bucket-send{k}", sum(b - a for _, a, b in theirs) + len(theirs), torch.float32)
                _pack_grads_flagged(theirs, out)
                requests.append(dist.isend(out, dst=self._global(to), group=group))
            if mine:
                into = self._scratch(f"bucket-recv{k}", n_mine + len(mine), torch.float32)
                received.append(into)
                requests.append(dist.irecv(into, src=self._global(frm), group=group))
        for request in requests:
            request.wait()
        flags = [p.grad is not None for p, _, _ in mine]
        for into in received:
            flags = [f or t != 0 for f, t in zip(flags, into[n_mine:].tolist())]
        shards, pos = [], 0
        for (p, a, b), has in zip(mine, flags):
            n = b - a
            if has:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                g = p.grad.view(-1)[a:b]
                # The order and precision of _reduce_to_owners: fp32 grads in place, others
                # (bf16, fp16) in fp32, rounded back once.
                acc = g if g.dtype == torch.float32 else self._scratch("bucket-acc", n, torch.float32).copy_(g)
                for into in received:
                    acc += into[pos:pos + n]
                acc /= world
                if acc is not g:
                    g.copy_(acc)
                shard = self.shard_of[p]
                shard.grad = g
                shards.append(shard)
            pos += n
        return shards

    def _reduce_bucket_shared(self, spans, group) -> list[torch.nn.Parameter]:
        """reduce_bucket through the shared-memory outboxes ([Note: shared params]): each rank
        writes its grads of an owner's slices into its outbox for that owner, then sends the
        owner only the slices' flags over `group`; the owner reads the outboxes of the peers
        whose flags it has, summing in the order of _reduce_through_shared."""
        rank, world = self.rank, self.world
        mine = spans[rank]
        requests, flags_of = [], {}
        for k in range(1, world):
            to, frm = (rank + k) % world, (rank - k) % world
            theirs = spans[to]
            if theirs:
                slices = [(self._outbox_pos[(to, id(q))], q, a, b) for q, a, b in theirs]
                requests.append(self._send_through_outbox(self._outbox[rank][to], slices, f"bucket-flags-send{k}",
                                                          to, group))
            if mine:
                flags_of[frm] = self._scratch(f"bucket-flags-recv{k}", len(mine), torch.float32)
                requests.append(dist.irecv(flags_of[frm], src=self._global(frm), group=group))
        for request in requests:
            request.wait()
        peers = [r for r in range(world) if r != rank]
        seen = [flags_of[r].tolist() for r in peers] if mine else []
        shards = []
        for i, (p, a, b) in enumerate(mine):
            if p.grad is None and not any(f[i] for f in seen):
                continue  # no rank had a grad of this slice
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            flat = p.grad.view(-1)
            self._average_from_boxes(flat, a, b, self._outbox_pos[(rank, id(p))],
                                     [self._outbox[r][rank] for r in peers], "bucket-acc")
            shard = self.shard_of[p]
            shard.grad = flat[a:b]
            shards.append(shard)
        return shards

    def _send_through_outbox(self, box: torch.Tensor, slices: list, use: str, reader: int, group):
        """Writes this rank's grads of `slices` ((offset in `box`, param, start, end); zeros
        where the param has no grad) into its outbox `box`, then sends `reader` one flag per
        slice (1: this rank had a grad there) through `group`. Returns the send's request."""
        for at, q, a, b in slices:
            if q.grad is None:
                box[at:at + b - a].zero_()
            else:
                box[at:at + b - a] = q.grad.view(-1)[a:b]
        flags = self._scratch(use, len(slices), torch.float32)
        flags.copy_(torch.tensor([float(q.grad is not None) for _, q, _, _ in slices]))
        # Why after the writes: `reader` reads this outbox once the flags have arrived.
        return dist.isend(flags, dst=self._global(reader), group=group)

    def note_bucketed_reduction(self) -> None:
        """After every bucket of a step went through reduce_bucket: learns whether any rank had
        a grad (a collective on this partition's group), as reduce_grads does. With shared
        memory it is also what keeps the outboxes safe: no rank passes it, and so none writes
        its outboxes for the next step, before every owner has read this step's."""
        local = torch.tensor([int(any(p.grad is not None for p in self.params))], dtype=torch.int32,
                             device=self._device)
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
        self.any_grad = bool(local.item())

    def every_rank(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank (a collective)."""
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self._device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())


def _pack_grads_flagged(span, flat: torch.Tensor) -> None:
    """The grads of the slices of `span` ((param, start, end)) into `flat`, back to back (zeros
    where a param has no grad), then one flag per slice: 1 where it has one."""
    offset = 0
    for p, a, b in span:
        if p.grad is None:
            flat[offset:offset + b - a].zero_()
        else:
            flat[offset:offset + b - a] = p.grad.view(-1)[a:b]
        offset += b - a
    flat[offset:] = torch.tensor([float(p.grad is not None) for p, _, _ in span])
