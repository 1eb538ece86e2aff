"""[Note: streamed pages] in paging/scheduler.py: an overlapped step on a store read through
slots runs its pages on a thread of its own as they are fed. The stored result equals the
step that runs them all at finish(); rewind() forgets what ran (nothing was committed); an
update that fails in the thread is raised at finish() with nothing committed; abandon()
stops the thread."""
from __future__ import annotations

import threading

import pytest
import torch

from offload_engine.paging.footprint import slots
from offload_engine.paging.nvme_store import NvmeStore
from offload_engine.paging.pool import SlotPool
from offload_engine.paging.scheduler import PageScheduler
from offload_engine.paging.stores import PagingError

PAGE = 4096
PAGES = 11


def _scheduler(tmp_path, name, depth=2):
    store = NvmeStore(PAGE, str(tmp_path / name))
    store.allocate(PAGES)
    pool = SlotPool(slots("nvme", "cpu", depth).host, PAGE)
    buf = pool.slots[0]  # aligned, as direct IO needs
    for page in range(PAGES):
        buf.fill_(page)
        store.write(page, buf).result()
    store.commit(range(PAGES))
    _AUX[store] = SlotPool(1, PAGE)
    return PageScheduler(store, pool, depth), store


_AUX: dict = {}  # store -> an aligned buffer to read it back with


def _stored(store) -> list[bytes]:
    buf = _AUX[store].slots[0]
    out = []
    for page in range(PAGES):
        store.read(page, buf).result()
        out.append(bytes(buf.numpy()))
    return out


def _update(page, buf):
    view = buf.view(torch.uint8)
    view.mul_(3).add_(page + 1)  # not idempotent: running a page twice shows


def _feed_streamed(sched, chunks):
    sched.start(_update)
    sched.stream()
    feeder = threading.Thread(target=lambda: [sched.feed(c) for c in chunks])
    feeder.start()
    feeder.join()


def test_streamed_equals_run_at_finish(tmp_path):
    listed, listed_store = _scheduler(tmp_path, "a")
    listed.run(list(range(PAGES)), _update)
    streamed, streamed_store = _scheduler(tmp_path, "b")
    _feed_streamed(streamed, [[0, 1], [2], [3, 4, 5, 6], [7], [8, 9, 10]])
    stats = streamed.finish()
    assert stats.pages == PAGES and streamed.pages_updated == PAGES
    assert _stored(streamed_store) == _stored(listed_store)
    assert _stored(streamed_store) != _stored(_scheduler(tmp_path, "c")[1])  # the update did change them
    assert streamed.pool.in_use == 0
    assert torch.get_num_threads() == threads  # the thread's one kernel thread is its own


threads = torch.get_num_threads()


def test_rewind_forgets_what_ran_and_the_step_goes_on(tmp_path):
    reference, ref_store = _scheduler(tmp_path, "a")
    reference.run(list(range(PAGES)), _update)
    sched, store = _scheduler(tmp_path, "b")
    _feed_streamed(sched, [[0, 1, 2], [3, 4]])
    sched.rewind()  # pages 0-4 ran; none is committed, so the store still holds the pre-step bytes
    sched.feed(list(range(PAGES)))  # all run again, once each in the result
    sched.finish()
    assert _stored(store) == _stored(ref_store)


def test_a_failed_update_in_the_thread_is_raised_at_finish_and_nothing_is_committed(tmp_path):
    sched, store = _scheduler(tmp_path, "a")
    before = _stored(store)

    def failing(page, buf):
        if page == 5:
            raise ValueError("boom")
        _update(page, buf)
    sched.start(failing)
    sched.stream()
    sched.feed(list(range(PAGES)))
    with pytest.raises(PagingError, match="page 5.*boom"):
        sched.finish()
    assert _stored(store) == before and sched.pool.in_use == 0


def test_abandon_stops_the_thread_and_commits_nothing(tmp_path):
    sched, store = _scheduler(tmp_path, "a")
    before = _stored(store)
    _feed_streamed(sched, [[0, 1, 2, 3]])
    runner = sched._runner
    sched.abandon()
    assert not runner.is_alive() and sched.pool.in_use == 0
    assert _stored(store) == before
