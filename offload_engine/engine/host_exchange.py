"""HostExchange: the data-parallel partition's exchange when its ranks span several hosts,
each with several ranks (mixed into Partition, partition.py, whose spans, scratch buffers and
shared-memory arena it uses).

[Note: hierarchical exchange] Ranks that share a host keep the shared-memory path of
[Note: shared params] (partition.py); only what must leave a host crosses the network, once
per host instead of once per rank. Hosts are ordered by their first rank and must each have
the same number of ranks, L; a rank's *local index* is its place among its host's ranks, and
the *column* c is the set of ranks with local index c, one per host.

  - The params live in one shared-memory arena per host. Partition rank 0's values become
    every host's at setup (the first rank of each host broadcasts over a group of those first
    ranks).
  - Grads: local rank c of a host sums its host's grads of every slice owned by a rank of
    column c (its own grads plus its host peers' outboxes, in local order): one partial sum
    per slice per host. It then sends each partial to the slice's owner on another host (the
    owner's column peer there) and receives the other hosts' partials of its own slices,
    which it adds in host order (round k: from the host k before), then divides by the world.
    Every rank exchanges its own column, so all L ranks of a host use the link at once (one
    leader per host would carry the same bytes in series), and the link carries
    (H - 1) / H of the grads per host, not L times that as when every rank sends its own.
  - Readiness within a host is a small flag message per slice over gloo, sent after the
    outbox writes (as _reduce_bucket_shared does): it tells the column rank that a peer's grads
    are there to read, and whether the peer had a grad at all. A slice no rank had a grad of
    keeps none, as in one process. The same exchange serves reduce_grads (a chunk of at most
    _CHUNK_ELEMENTS per owner at a time) and, during backward, reduce_bucket.
  - Params: after the update each owner sends its slices to its column peer on every other
    host, which writes them into its host's arena; a barrier of the host's ranks then ends
    gather_params: every slice of this host's params is written before any of them runs the
    next forward.
  - An outbox is written again only after the next step's first collective over every rank,
    which no rank passes before every column rank has read this step's (as in
    [Note: shared params]).

The sums are the one-process sums in another order (fp32): equal within the data-parallel
tolerances, not bit for bit. Hosts with unequal rank counts, or one rank each, keep plain gloo.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .shared_memory import SharedArena, aligned
from .spans import pack, sub_span, unpack

log = logging.getLogger(__name__)


class HostExchange:
    """Partition's methods for ranks on several hosts ([Note: hierarchical exchange])."""

    # ---- setup -----------------------------------------------------------------------------------
    def _share_across_hosts(self, host_ids: list) -> str:
        """Sets up the hierarchical exchange for ranks whose hosts are `host_ids` (by partition
        rank); returns "" when done, else why it was not (every rank alike). A collective."""
        hosts: list[list[int]] = []
        index: dict = {}
        for r, hid in enumerate(host_ids):
            if hid not in index:
                index[hid] = len(hosts)
                hosts.append([])
            hosts[index[hid]].append(r)
        per_host = {len(h) for h in hosts}
        if len(per_host) != 1:
            return "the hosts run different numbers of ranks (" + ", ".join(str(len(h)) for h in hosts) + ")"
        if len(hosts[0]) == 1:
            return "each host runs one rank"
        # Why every rank makes every group: new_group is a collective of the whole world.
        local_groups = [dist.new_group(ranks=[self._global(r) for r in h], backend="gloo") for h in hosts]
        leaders = dist.new_group(ranks=[self._global(h[0]) for h in hosts], backend="gloo")
        me = self.rank
        h = index[host_ids[me]]
        host_of = {r: x for x, hr in enumerate(hosts) for r in hr}
        local_of = {r: i for hr in hosts for i, r in enumerate(hr)}
        local = local_groups[h]
        n_local = len(hosts[0])

        offset, param_at = 0, []
        for p in self.params:
            param_at.append(offset)
            offset += aligned(p.numel() * p.element_size())
        sizes = [sum(b - a for _, a, b in self.spans(r)) for r in range(self.world)]
        column_size = [sum(sizes[hr[c]] for hr in hosts) for c in range(n_local)]
        outbox_at = {}
        for r in range(n_local):
            for c in range(n_local):
                if c != r:
                    outbox_at[(r, c)] = offset
                    offset += aligned(column_size[c] * 4)
        arena, why = SharedArena.create(offset, local)
        # Why agree: a host without an arena would leave the others waiting in a path it does not take.
        reasons = [None] * self.world
        dist.all_gather_object(reasons, why if arena is None else "", group=self.group)
        failed = [(host_of[r], msg) for r, msg in enumerate(reasons) if msg]
        if failed:
            return f"no shared memory on host {failed[0][0]} ({failed[0][1]})"
        shared = [arena.region(at, p.numel(), p.dtype) for p, at in zip(self.params, param_at)]
        if local_of[me] == 0:
            for p, flat in zip(self.params, shared):
                flat.copy_(p.detach().reshape(-1))
            for flat in shared:  # partition rank 0's values on every host
                dist.broadcast(flat, src=self._global(0), group=leaders)
        # Why: the host's arena holds rank 0's values before any rank of it points its params there.
        dist.barrier(group=local)
        for p, flat in zip(self.params, shared):
            p.data = flat.view(p.shape)
        self._outbox = [{c: arena.region(outbox_at[(r, c)], column_size[c], torch.float32)
                         for c in range(n_local) if c != r} for r in range(n_local)]
        for c in range(n_local):  # where owner o's slice of q starts in a box for column c, less its start in q
            pos = 0
            for hr in hosts:
                o = hr[c]
                for q, a, b in self.spans(o):
                    self._column_pos[(o, id(q))] = pos - a
                    pos += b - a
        self._hosts, self._host_of, self._local_of, self._local_group = hosts, host_of, local_of, local
        self.transport = "hierarchical"
        log.info("data parallel: %d hosts x %d ranks; within a host params and grads are shared in memory "
                 "(%.0f MiB), across hosts each rank exchanges its column over gloo", len(hosts), n_local,
                 offset / 2**20)
        return ""

    # ---- grads -----------------------------------------------------------------------------------
    def _column(self, c: int) -> list[int]:
        """The ranks with local index `c`, in host order."""
        return [hr[c] for hr in self._hosts]

    def _reduce_across_hosts(self, spans: list, group, tag: str) -> list[tuple[torch.Tensor, int, int]]:
        """Averages over every rank the grads of this rank's slices in `spans` (per rank, the
        (param, start, end) slices to reduce now; the same on every rank) through `group`
        ([Note: hierarchical exchange]). Returns this rank's slices that some rank had a grad
        of, each now holding the average in the param's grad; the others are left as they were."""
        me, world = self.rank, self.world
        h, col = self._host_of[me], self._local_of[me]
        hosts, n_hosts, n_local = self._hosts, len(self._hosts), len(self._hosts[0])
        pos = self._column_pos
        column = self._column(col)
        my_column = [(o, q, a, b) for o in column for q, a, b in spans[o]]
        requests, flags_of = [], {}
        for c in range(n_local):  # this rank's grads of column c's slices to local rank c's outbox
            if c == col:
                continue
            peer = hosts[h][c]
            theirs = [(o, q, a, b) for o in self._column(c) for q, a, b in spans[o]]
            if theirs:  # local rank c reads this outbox once the flags have arrived
                slices = [(pos[(o, id(q))] + a, q, a, b) for o, q, a, b in theirs]
                requests.append(self._send_through_outbox(self._outbox[col][c], slices, f"{tag}-flags-send{c}",
                                                          peer, group))
            if my_column:
                flags_of[c] = self._scratch(f"{tag}-flags-recv{c}", len(my_column), torch.float32)
                requests.append(dist.irecv(flags_of[c], src=self._global(peer), group=group))
        for request in requests:
            request.wait()
        peers = [c for c in range(n_local) if c != col]
        boxes = [self._outbox[c][col] for c in peers]
        seen = [flags_of[c].tolist() for c in peers] if my_column else []
        host_has = [q.grad is not None or any(f[i] for f in seen) for i, (_, q, _, _) in enumerate(my_column)]

        # The host's partial sums of the column's slices on other hosts, sent to their owners.
        requests, received, i = [], [], 0
        first_of = {}
        for o in column:
            first_of[o] = i
            i += len(spans[o])
        for k in range(1, n_hosts):
            to, frm = hosts[(h + k) % n_hosts][col], hosts[(h - k) % n_hosts][col]
            theirs = spans[to]
            if theirs:
                n = sum(b - a for _, a, b in theirs)
                out = self._scratch(f"{tag}-send{k}", n + len(theirs), torch.float32)
                at = 0
                for q, a, b in theirs:
                    part = out[at:at + b - a]
                    if q.grad is None:
                        part.zero_()
                    else:
                        part.copy_(q.grad.view(-1)[a:b])
                    x = pos[(to, id(q))] + a
                    for box in boxes:
                        part += box[x:x + b - a]
                    at += b - a
                flags = host_has[first_of[to]:first_of[to] + len(theirs)]
                out[at:] = torch.tensor([float(f) for f in flags])
                requests.append(dist.isend(out, dst=self._global(to), group=group))
            mine = spans[me]
            if mine:
                n = sum(b - a for _, a, b in mine)
                into = self._scratch(f"{tag}-recv{k}", n + len(mine), torch.float32)
                received.append(into)
                requests.append(dist.irecv(into, src=self._global(frm), group=group))
        for request in requests:
            request.wait()

        mine = spans[me]
        n_mine = sum(b - a for _, a, b in mine)
        remote = [into[n_mine:].tolist() for into in received]
        done, at = [], 0
        for j, (p, a, b) in enumerate(mine):
            n = b - a
            if host_has[first_of[me] + j] or any(f[j] for f in remote):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                g = p.grad.view(-1)[a:b]
                # fp32 grads sum in place; others (bf16, fp16) in fp32, rounded back once.
                acc = g if g.dtype == torch.float32 else self._scratch(f"{tag}-acc", n, torch.float32).copy_(g)
                x = pos[(me, id(p))] + a
                for box in boxes:
                    acc += box[x:x + n]
                for into in received:
                    acc += into[at:at + n]
                acc /= world
                if acc is not g:
                    g.copy_(acc)
                done.append((p, a, b))
            at += n
        return done

    def _reduce_hierarchical(self, with_grad: list[torch.Tensor], chunk_elements: int) -> None:
        """reduce_grads across hosts: every rank's grads of `with_grad` (the params some rank has
        a grad of; each has one here) averaged into their owners' slices, at most
        `chunk_elements` of each owner's slices at a time."""
        has = {id(p) for p in with_grad}
        spans = [[(p, a, b) for p, a, b in self.spans(r) if id(p) in has] for r in range(self.world)]
        sizes = [sum(b - a for _, a, b in s) for s in spans]
        for lo in range(0, max(sizes), chunk_elements):
            part = [sub_span(s, lo, min(n, lo + chunk_elements)) for s, n in zip(spans, sizes)]
            self._reduce_across_hosts(part, self.group, "hier")

    # ---- params ----------------------------------------------------------------------------------
    def _gather_across_hosts(self, chunk_elements: int) -> None:
        """gather_params across hosts: this rank's updated slices to its column peer on every
        other host, theirs into this host's arena, then a barrier of the host's ranks."""
        me = self.rank
        h, col = self._host_of[me], self._local_of[me]
        n_hosts = len(self._hosts)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            spans = [self._spans(params, r) for r in range(self.world)]
            for k in range(1, n_hosts):
                to, frm = self._hosts[(h + k) % n_hosts][col], self._hosts[(h - k) % n_hosts][col]
                n_out = sum(b - a for _, a, b in spans[me])
                n_in = sum(b - a for _, a, b in spans[frm])
                # Each pair walks the same chunks of the sender's slices, so every isend meets its irecv.
                for lo in range(0, max(n_out, n_in), chunk_elements):
                    requests, into = [], None
                    if lo < n_out:
                        out = self._scratch("hier-gather-send", min(n_out, lo + chunk_elements) - lo, dtype)
                        pack(sub_span(spans[me], lo, lo + out.numel()), out)
                        requests.append(dist.isend(out, dst=self._global(to), group=self.group))
                    if lo < n_in:
                        into = self._scratch("hier-gather-recv", min(n_in, lo + chunk_elements) - lo, dtype)
                        requests.append(dist.irecv(into, src=self._global(frm), group=self.group))
                    for request in requests:
                        request.wait()
                    if into is not None:
                        unpack(into, sub_span(spans[frm], lo, lo + into.numel()))
        # Why: every slice of this host's params (its owners' updates and the other hosts') is
        # written before any rank of the host returns to run the next forward on them.
        dist.barrier(group=self._local_group)
