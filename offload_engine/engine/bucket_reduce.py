"""BucketReducer: with paging.overlap "exact" and several ranks, the grads reach their owners
during backward, a bucket at a time, so that the owner's pages can be updated then.

[Note: reduce during backward] Each rank's post-accumulate-grad hooks tell the reducer which
full params have their grads final (grad_is_final, on the autograd thread). The reducer's
thread ("oe-grad-reduce") walks the buckets of Partition.buckets() in their fixed order (the
same on every rank, whatever order this rank's hooks fire in) and exchanges the next bucket
as soon as all its params are final here ([Note: reduce per bucket] in partition.py); each
shard that comes back with an averaged grad is handed to `on_ready` (the open overlapped
step's ready(), which may update its pages there and then). A param that this backward
cannot reach (found from the loss's autograd graph before it starts, 0.4 ms for GPT 42.7M's: unused in this
micro-batch's forward, its grad from an earlier micro-batch of the window or none) is final
from the start; one the graph reaches but whose grad never comes holds its bucket back until
finish(), after backward, which exchanges every bucket not yet done. So
every rank exchanges every bucket exactly once per step, in the same order: the pairs of
sends and receives always meet.

The reducer runs at every accumulation boundary, whether or not the optimizer could open an
overlapped step (its first step lays out the pages; the shards' grads are reduced the same
way then), so the ranks never disagree on who reduces how.

Why a thread: the exchange waits on the other ranks' backward, and the owner's page updates
take time of their own; on the autograd thread both would hold up the rest of this rank's
backward. The thread runs its kernels on one OpenMP thread, leaving torch's team to backward.
"""
from __future__ import annotations

import queue
import threading

import torch

from ..paging.scheduler import phase

_FLUSH = object()   # backward is over: exchange every bucket left
_STOP = object()    # the step is dropped: exchange nothing more
_UNREACHED = object()  # tags a param taken as final from the start (params_reached)


class BucketReducer:
    def __init__(self, partition, bucket_elements: int):
        self.partition = partition
        self.buckets = partition.buckets(bucket_elements)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.group = partition.side_group()
        self._thread = None
        self._queue = None
        self._error = None
        self._ready_error = None
        self._handing = threading.Lock()  # held while a bucket's shards go to on_ready
        self._dropped = False
        self.buckets_in_backward = 0  # of the last step: buckets exchanged before finish()
        self.done_in_backward = 0     # of the last step: count_done() when backward was over

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, on_ready, count_done=None, unreached=()) -> None:
        """Before the backward that ends an accumulation window: `on_ready(shards)` (or None)
        takes each bucket's shards once their grads are averaged; `count_done()` (or None),
        called on the thread when backward is over, gives `done_in_backward`; `unreached`:
        params this backward cannot give a grad, final from the start."""
        if self._thread is not None:
            return
        self.done_in_backward = 0
        self._count_done = count_done
        self._queue = queue.SimpleQueue()
        self._error = self._ready_error = None
        self._dropped = False
        self._backward_over = False
        self.buckets_in_backward = 0
        # Daemon: a rank whose backward failed drops the step (stop()) without waiting for a
        # thread that may be blocked on a peer's message; the process must still be able to exit.
        self._thread = threading.Thread(target=self._run, args=(on_ready,), name="oe-grad-reduce", daemon=True)
        self._thread.start()
        for p in unreached:
            self._queue.put((_UNREACHED, p))

    def grad_is_final(self, param: torch.Tensor) -> None:
        """From a post-accumulate-grad hook: `param`'s grad is final on this rank."""
        if self._thread is not None:
            self._queue.put(param)

    def finish(self) -> None:
        """After backward: exchanges the buckets left, waits for the thread and notes whether
        any rank had a grad; raises the thread's error (a failed exchange first, else a failed
        page update)."""
        if self._thread is None:
            raise RuntimeError("BucketReducer.finish: no reduction is running (start() first)")
        thread, self._thread = self._thread, None
        self._queue.put(_FLUSH)
        thread.join()
        if self._error is not None:
            raise self._error
        self.partition.note_bucketed_reduction()
        if self._ready_error is not None:
            raise self._ready_error

    def stop(self) -> None:
        """Drops the exchange (backward failed): once it returns, the thread hands nothing more
        to on_ready (the caller drops the step next); it ends after the bucket it is in, which
        may wait on a peer."""
        thread, self._thread = self._thread, None
        if thread is not None:
            with self._handing:
                self._dropped = True
            self._queue.put(_STOP)

    def _run(self, on_ready) -> None:
        torch.set_num_threads(1)  # per thread: backward keeps torch's team
        missing = [len(bucket) for bucket in self.buckets]  # params of each bucket not final yet
        final, assumed, done = set(), set(), 0
        try:
            with torch.no_grad():
                while True:  # until finish() or stop(), even with every bucket done
                    item = self._queue.get()
                    if item is _STOP:
                        return
                    if item is _FLUSH:
                        self._backward_over = True
                        if self._count_done is not None and on_ready is not None:
                            # here: this thread alone feeds the step, so counting cannot race a feed
                            self.done_in_backward = self._count_done()
                        missing = [0] * len(missing)
                    elif isinstance(item, tuple):  # (_UNREACHED, param)
                        param = item[1]
                        assumed.add(id(param))
                        final.add(id(param))
                        missing[self._bucket_of[id(param)]] -= 1
                    elif id(item) in assumed:
                        # A guard: params_reached refuses graphs that could hide a param, so this
                        # means its bucket went with a grad that was not final. The exchange goes
                        # on (the peers wait for it); finish() raises and the step is dropped.
                        self._error = self._error or RuntimeError(
                            f"a param of shape {list(item.shape)} got its grad during backward after it was taken "
                            "as unreached by the loss's autograd graph (paging.overlap 'exact'); its bucket was "
                            "reduced without it")
                    elif id(item) not in final:
                        final.add(id(item))
                        missing[self._bucket_of[id(item)]] -= 1
                    while done < len(self.buckets) and missing[done] == 0:
                        on_ready = self._exchange(done, on_ready)
                        done += 1
                    if item is _FLUSH:
                        return
        except BaseException as err:  # finish() raises it on the caller's thread
            self._error = self._error or err

    def _exchange(self, index: int, on_ready):
        with phase("grad_reduce_bucket"):
            shards = self.partition.reduce_bucket(self.buckets[index], self.group)
        if not self._backward_over:
            self.buckets_in_backward += 1
        if on_ready is None or not shards:
            return on_ready
        # Why the lock: stop() on the caller's thread must not return while a page update
        # started here is still running into the step it is about to drop.
        with self._handing:
            if self._dropped:
                return None
            try:
                on_ready(shards)
            except BaseException as err:  # noqa: BLE001 - the exchange goes on: the peers wait for it
                self._ready_error = err
                return None
        return on_ready


def params_reached(loss: torch.Tensor) -> set[int] | None:
    """ids of the leaf tensors whose grads backward from `loss` accumulates: the variables of
    the AccumulateGrad nodes its autograd graph reaches; None when the graph cannot say: it
    holds a custom autograd.Function, whose backward may reach params that are not its inputs
    (reentrant activation checkpointing recomputes its forward there)."""
    found, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return None
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found
