"""Paged optimizers: the moments live in a page store (host RAM or an NVMe file) and are moved
a page at a time through a bounded slot pool to the update kernels and back: the SIMD CPU
kernels for CPU params (or, with ``executor="cpu"``, for CUDA params through pinned copies:
paging/cpu_offload.py), the CUDA kernels through device slots for CUDA params
(paging/cuda_pipeline.py: from pinned host pages, from the NVMe file through pinned
staging, or prefetched by the driver from CUDA managed memory with ``store="managed"``).

    PagedAdam, PagedAdamW                 fp32 moments
    PagedAdam8bit, PagedAdamW8bit         8-bit block-quantized moments
    PagedLion, PagedLion8bit              Lion, fp32 or 8-bit momentum

Constructors as bitsandbytes' (``params, lr, betas, eps, weight_decay, amsgrad=False,
min_8bit_size=4096``), plus keyword options ``store="cpu"|"nvme"|"managed"``, ``nvme_path``,
``page_size_mb``, ``prefetch_depth`` (and ``block_size``, ``io_threads``, ``executor``). Results
are bit for bit those of the unpaged optimizers (Adam8bit, AdamW8bit, Lion, ...), whatever the
page size, store or executor.

[Note: failed steps] A step that fails (an IO error, a kernel error, Ctrl-C) raises an error
naming the page and the file. The stored state is then the pre-step one: NvmeStore commits a
step's pages only after all were written ([Note: shadow pages]); the host store is updated in
place, so there the pages before the failing one hold post-step state. Params of the pages
updated before the failure hold their new values either way, so the optimizer refuses further
steps until load_state_dict() restores a checkpoint (a failure before any page was updated
changes nothing and is not recorded).
"""
from __future__ import annotations

import copy
import functools

import torch

from ..paging import HostStore, NvmeStore, PageScheduler, PageTable, SlotPool, StateFormat, page_bytes_from_mb
from ..paging.scheduler import StepStats
from ..quant import FORMATS, codec
from . import sharded
from ._base import _SIGNED, BlockwiseOptimizer
from .paged_step import _PagedStep

STORES = ("cpu", "nvme", "managed")
EXECUTORS = ("auto", "cpu", "cuda")  # auto: the params' device
DEFAULT_PAGE_SIZE_MB = 16
DEFAULT_PREFETCH_DEPTH = 2


class PagedOptimizer(BlockwiseOptimizer):
    """A BlockwiseOptimizer whose moments live in pages of a store (module docstring)."""

    def __init__(self, params, *, store="cpu", nvme_path=None, page_size_mb=DEFAULT_PAGE_SIZE_MB,
                 prefetch_depth=DEFAULT_PREFETCH_DEPTH, io_threads=4, executor="auto", **settings):
        name = type(self).__name__
        if store not in STORES:
            raise ValueError(f"{name}: store must be one of {', '.join(map(repr, STORES))}; got store={store!r}")
        page_bytes = page_bytes_from_mb(page_size_mb)
        for option, value in (("prefetch_depth", prefetch_depth), ("io_threads", io_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {option} must be an int >= 1, got {option}={value!r}")
        if store != "nvme" and nvme_path is not None:
            raise ValueError(f"{name}: nvme_path is only used with store='nvme' (got store={store!r}, "
                             f"nvme_path={nvme_path!r})")
        super().__init__(params, **settings)
        # By default the executor follows the params: CPU params are updated by the SIMD kernels,
        # CUDA params by the CUDA kernels through device slots (paging/cuda_pipeline.py).
        self._device = _params_device(self.param_groups, name)
        if executor not in EXECUTORS:
            raise ValueError(f"{name}: executor must be one of {', '.join(map(repr, EXECUTORS))}; got "
                             f"executor={executor!r}")
        if executor == "auto":
            executor = self._device.type
        if executor == "cuda" and self._device.type != "cuda":
            raise ValueError(f"{name}: executor='cuda' updates CUDA params; the params are on {self._device}")
        self._executor = executor
        if store == "managed" and executor != "cuda":
            raise ValueError(f"{name}: store='managed' (CUDA managed memory) is updated by the CUDA executor; got "
                             f"executor={executor!r} with params on {self._device}. Use store='cpu' or 'nvme'")
        # CUDA params updated by the CPU kernels: copies through pinned host buffers.
        self._offload = None
        if executor == "cpu" and self._device.type == "cuda":
            from ..paging.cpu_offload import CudaParamsOnCpu
            self._offload = CudaParamsOnCpu(self._device)
        if store == "nvme":
            self._store = NvmeStore(page_bytes, nvme_path, io_threads=io_threads)
        elif store == "managed":
            from ..paging.managed_store import ManagedStore
            self._store = ManagedStore(page_bytes, self._device)
        else:
            self._store = HostStore(page_bytes, pin_memory=executor == "cuda")  # pinned: async H2D/D2H copies
        self._table = PageTable(page_bytes)
        self._prefetch_depth = prefetch_depth
        self._pool: SlotPool | None = None
        self._scheduler: PageScheduler | None = None
        self._keys: dict = {}          # param -> key (its index in the flat param order)
        self._failed: str | None = None
        self._last_stats = StepStats()
        self._totals = StepStats()
        self._steps = 0

    # ---- layout ---------------------------------------------------------------------------
    def _state_format(self, group, p) -> StateFormat:
        fmt = self._format_for(group, p)
        return StateFormat(fmt, tuple(self._moments), 0 if fmt == "fp32" else group["block_size"],
                           master=self._wants_master(group, p))

    def _ensure_layout(self, wanted, states=None) -> list:
        """Lays out the params in `wanted` that have no pages yet, reserves their pages in the
        store and writes their initial state, or their state from `states` ({key: {array
        name: full tensor}}) when given. Returns the new pages. Changes nothing when the store
        cannot grow.

        [Note: lazy layout] A param gets pages when it first needs state (its first grad, or a
        loaded state), as torch.optim creates state lazily: frozen params (a LoRA base model
        passed whole) never cost a byte of store, and loading an empty state dict (accelerate
        does one at startup) writes nothing. A param's key is its index in the flat param
        order, which later groups only extend."""
        wanted = [p for p in wanted if p not in self._keys]
        if not wanted:
            return []
        table = copy.deepcopy(self._table)
        keys = dict(self._keys)
        wanted_ids = {id(p) for p in wanted}
        new_pages, flat_index = [], 0
        for gi, group in enumerate(self.param_groups):
            entries = []
            for p in group["params"]:
                if id(p) in wanted_ids:
                    keys[p] = flat_index
                    # A sharded param's pages hold its local shard ([Note: sharded params] in sharded.py).
                    entries.append((flat_index, sharded.local_numel(p), self._state_format(group, p)))
                flat_index += 1
            if entries:
                new_pages += table.add_group(gi, entries)
        self._store.allocate(table.num_pages)  # raises PageIOError (disk full) before anything changes
        if self._scheduler is None:
            self._scheduler = self._make_scheduler(table.page_bytes)
        # The new pages get their initial state before the layout is adopted: if a write fails,
        # the optimizer keeps the old layout (the extra room reserved in the store is unused).
        params = {key: p for p, key in keys.items()}

        def fill(page, buf):
            _fill_initial(table.pages[page], buf, params=params)
            _copy_states_into(table.pages[page], buf, states or {})

        self._write_pages(new_pages, fill, read_first=False)
        self._table, self._keys = table, keys
        return new_pages

    def _make_scheduler(self, page_bytes: int):
        """The step's pipeline for this store and executor. Slots: prefetch_depth fetching + one
        updating + one writing back, so a step allocates nothing more; an in-place store (host
        memory with the CPU executor, managed memory) needs none on the host."""
        if not self._store.in_place:
            # The NVMe store's host slots; the CUDA executor copies from them, so they are pinned
            # and one more lets a write to the file overlap the next reads.
            cuda = self._executor == "cuda"
            self._pool = SlotPool(self._prefetch_depth + (3 if cuda else 2), page_bytes, pin_memory=cuda)
        if self._executor != "cuda":
            return PageScheduler(self._store, self._pool, self._prefetch_depth)
        from ..paging import cuda_pipeline
        if self._store.kind == "nvme":
            return cuda_pipeline.NvmePagePipeline(self._store, self._device, self._prefetch_depth, self._pool)
        if self._store.kind == "managed":
            return cuda_pipeline.ManagedPagePipeline(self._store, self._device, self._prefetch_depth)
        return cuda_pipeline.CudaPagePipeline(self._store, self._device, self._prefetch_depth)

    def _key_of(self, param) -> int:
        try:
            return self._keys[param]
        except KeyError:
            raise KeyError(f"{type(self).__name__}: that tensor is not a param of this optimizer (or has no state "
                           "yet)") from None

    # ---- page access outside a step ---------------------------------------------------------
    def _read_pages(self, pages):
        """Yields (page, buffer) with each page's current bytes (a view for the host store, a
        pool slot for NVMe: valid until the next item)."""
        for page in pages:
            if self._store.in_place:
                yield page, self._store.page_view(page)
            else:
                buf = self._pool.slots[0]
                self._store.read(page, buf).result()
                yield page, buf

    def _write_pages(self, pages, fill, *, read_first=True) -> None:
        """Rewrites `pages`: fill(page, buf) edits a buffer holding the page's current bytes
        (or undefined bytes, without `read_first`). For NVMe the new pages become current
        together, after every write landed."""
        if not pages:
            return
        if self._store.in_place:
            for page in pages:
                fill(page, self._store.page_view(page))
            return
        buf = self._pool.slots[0]
        for page in pages:
            if read_first:
                self._store.read(page, buf).result()
            fill(page, buf)
            self._store.write(page, buf).result()
        self._store.commit(pages)

    def _gather(self, keys) -> dict:
        """{key: {array name: full tensor}} for params `keys`, read page by page."""
        out = {}
        for key in keys:
            fmt, n = self._table.fmt_of[key], self._table.numel_of[key]
            out[key] = {name: torch.empty(nbytes // dtype.itemsize, dtype=dtype)
                        for name, nbytes, dtype in fmt.arrays(n)}
        wanted = set(keys)
        pages = sorted({seg.page for key in keys for seg in self._table.segments_of[key]})
        for page, buf in self._read_pages(pages):
            for seg in self._table.pages[page].segments:
                if seg.key in wanted:
                    for name, piece in seg.views(buf).items():
                        at = _element_offset(seg, name, piece)
                        out[seg.key][name][at:at + piece.numel()].copy_(piece)
        return out

    def _scatter(self, states: dict, fresh=(), skip_pages=()) -> None:
        """Writes {key: {array name: full tensor}} into the pages (the inverse of _gather) and
        the initial state for the params in `fresh`, as one commit (pages in `skip_pages`
        are left alone)."""
        fresh = set(fresh)
        pages = sorted({seg.page for key in (*states, *fresh) for seg in self._table.segments_of[key]}
                       - set(skip_pages))

        params = {key: p for p, key in self._keys.items()}

        def fill(page, buf):
            _fill_initial(self._table.pages[page], buf, fresh, params)
            _copy_states_into(self._table.pages[page], buf, states)

        self._write_pages(pages, fill)

    # ---- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float = 1.0):
        """One update of every param with a grad, page by page; `grad_scale` multiplies the
        grads inside the kernels (BlockwiseOptimizer.step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_can_step(grad_scale)
        with_grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._ensure_layout(with_grads)
        if self._scheduler is None:  # no param has state yet (none has had a grad): nothing to update
            return loss
        run = _PagedStep(self, grad_scale)
        run.ready(with_grads)
        run.close()
        return loss

    def begin_overlapped_step(self, grad_scale: float = 1.0) -> "_PagedStep | None":
        """Opens a step whose pages are updated while backward still runs ([Note: overlapped
        step]): call ``ready(params)`` when their grads are final (post-accumulate-grad hooks)
        and ``close()`` after backward. Returns None when this optimizer cannot overlap (no
        pages laid out yet, or the CPU executor with CUDA params); step() then does it all."""
        if self._scheduler is None or self._offload is not None:
            return None
        self._check_can_step(grad_scale)
        return _PagedStep(self, grad_scale, pager_thread=self._executor == "cuda")

    def _check_can_step(self, grad_scale: float) -> None:
        if self._failed:
            raise RuntimeError(f"{type(self).__name__}: {self._failed}; params and state no longer match, so the "
                               "optimizer refuses to step: restore a checkpoint with load_state_dict()")
        self._check_step_inputs(grad_scale)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.device != self._device:
                    raise ValueError(f"{type(self).__name__} pages state to one device's executor ({self._device}); "
                                     f"a param of shape {list(p.shape)} is on {p.device}")

    def _record(self, stats: StepStats) -> None:
        self._last_stats = stats
        self._steps += 1
        self._totals.accumulate(stats)

    def paging_stats(self) -> dict:
        """The last step's paging figures (bytes read/written, seconds in fetch, update,
        write-back and waiting, slot occupancy), totals over all steps, and where the state
        lives (store, file, page and pool sizes, bytes at rest)."""
        totals = self._totals.as_dict()
        del totals["slots"], totals["mean_slots_in_use"]
        return {
            "store": self._store.kind,
            "path": getattr(self._store, "path", None),
            "direct_io": getattr(self._store, "direct", None),
            "page_bytes": self._table.page_bytes,
            "num_pages": self._table.num_pages,
            "prefetch_depth": self._prefetch_depth,
            "pool_slots": self._pool.num_slots if self._pool else 0,
            "pool_bytes": self._pool.nbytes if self._pool else 0,
            "device": str(self._device),
            "executor": self._executor,
            "pinned_host_bytes": self._offload.pinned_bytes if self._offload else 0,
            "device_pool_bytes": getattr(self._scheduler, "nbytes", 0),
            "state_bytes": self._table.state_bytes(),
            "store_bytes": self._store.nbytes,
            "steps": self._steps,
            "last_step": self._last_stats.as_dict(),
            "totals": totals,
        }

    def close(self) -> None:
        """Releases the store (for NVMe: deletes the state file). The optimizer is unusable after."""
        self._store.close()

    # ---- state access -----------------------------------------------------------------------
    def _state_arrays(self, param, state: dict) -> dict:
        key = self._key_of(param)
        return {**state, **self._gather([key])[key]}

    def _add_state_arrays(self, states: dict, params: list) -> None:
        """state_dict() as the unpaged optimizers' (same keys, formats and tensors): the arrays
        are read from the pages."""
        with_state = [key for key, p in enumerate(params) if self.state.get(p) and p in self._keys]
        for key, arrays in self._gather(with_state).items():
            fp32 = states[key]["format"] == "fp32"
            shape = sharded.local(params[key]).shape
            for name, tensor in arrays.items():
                as_param = fp32 or name == "master"  # full-size arrays take the param's shape
                states[key][name] = tensor.view(shape) if as_param else tensor

    def load_state_dict(self, state_dict):
        before = {p: dict(s) for p, s in self.state.items()}
        groups_before = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)  # validates and converts; moments land in self.state
        groups_of = [(g, p) for g in self.param_groups for p in g["params"]]
        params = [p for _, p in groups_of]
        states, fresh = {}, []
        for key, (group, p) in enumerate(groups_of):
            state = self.state.get(p)
            if not state:
                if p in self._keys:
                    fresh.append(key)  # laid out, but the checkpoint has no state for it: zero state
                continue
            fmt = self._state_format(group, p)
            states[key] = {name: state[name].reshape(-1) for name, _, _ in fmt.arrays(sharded.local_numel(p))}
        table, keys = self._table, self._keys
        try:
            # Params without pages get them now, written once with their loaded state
            # ([Note: lazy layout]); the pages already laid out are rewritten in place.
            new_pages = self._ensure_layout([params[key] for key in states], states)
            self._scatter(states, fresh, skip_pages=new_pages)
        except BaseException:
            self.state.clear()
            self.state.update(before)
            for group, saved in zip(self.param_groups, groups_before):  # lr, betas, ... as before
                group.clear()
                group.update(saved)
            self._table, self._keys = table, keys  # pages reserved for new params stay unused
            raise
        for key, p in enumerate(params):  # the moments now live in the pages: keep only metadata
            state = self.state.get(p)
            if state:
                for name, _, _ in self._table.fmt_of[key].arrays(sharded.local_numel(p)):
                    state.pop(name, None)
        self._failed = None


def _params_device(param_groups, name: str) -> torch.device:
    """The one device all params are on (CPU, or one CUDA device)."""
    devices = {p.device for g in param_groups for p in g["params"]}
    if len(devices) > 1:
        raise ValueError(f"{name}: all params must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: params on {device} are not supported (CPU or CUDA)")
    return device


def _element_offset(seg, name: str, piece: torch.Tensor) -> int:
    """Where a segment's array starts inside the param's full array (in that array's items)."""
    if seg.fmt.name == "fp32" or name == "master":
        return seg.start
    if name.endswith("_absmax"):
        return seg.start // seg.fmt.block
    return seg.start * FORMATS[seg.fmt.name].bits // 8  # codes: segments start on a block boundary


@functools.lru_cache(maxsize=None)
def _zero_code_byte(fmt_name: str, signed: bool) -> int:
    f = FORMATS[fmt_name]
    codes, _ = codec.quantize_blockwise(torch.zeros(128), f, signed, 128)
    return int(codes[0])


def _copy_states_into(page, buf: torch.Tensor, states: dict) -> None:
    """Copies the slices of full state arrays ({key: {array name: tensor}}) that `page` holds."""
    for seg in page.segments:
        if seg.key in states:
            for name, piece in seg.views(buf).items():
                at = _element_offset(seg, name, piece)
                piece.copy_(states[seg.key][name][at:at + piece.numel()])


def _fill_initial(page, buf: torch.Tensor, only=None, params=None) -> None:
    """The state of a param before its first step (zero moments, and its current value as the
    fp32 master when it has one), for the segments of `page` (those of params in `only`, when
    given); `params` maps keys to params."""
    if only is None:
        buf.zero_()
    for seg in page.segments:
        if only is not None and seg.key not in only:
            continue
        for name, piece in seg.views(buf).items():
            if name == "master":
                shard = sharded.local(params[seg.key]).detach()
                piece.copy_(shard.reshape(-1)[seg.start:seg.start + seg.length])
            elif name.endswith("_codes"):
                moment = name[: -len("_codes")]
                piece.fill_(_zero_code_byte(seg.fmt.name, _SIGNED[moment]))
            else:
                piece.zero_()


def _quantized(cls_name: str, fmt: str, adamw: bool):
    """Paged Adam/AdamW with fp32 or block-quantized moments."""

    class _Paged(PagedOptimizer):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2 if adamw else 0.0,
                     amsgrad=False, min_8bit_size=4096, *, block_size=None, maximize=False, store="cpu",
                     nvme_path=None, page_size_mb=DEFAULT_PAGE_SIZE_MB, prefetch_depth=DEFAULT_PREFETCH_DEPTH,
                     io_threads=4, executor="auto", stochastic_rounding=False, master_weights=False):
            super().__init__(params, store=store, nvme_path=nvme_path, page_size_mb=page_size_mb,
                             prefetch_depth=prefetch_depth, io_threads=io_threads, executor=executor, lr=lr,
                             betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, adamw_mode=adamw,
                             maximize=maximize, stochastic_rounding=stochastic_rounding, state_format=fmt,
                             block_size=block_size, min_8bit_size=min_8bit_size, master_weights=master_weights)

    _Paged.__name__ = _Paged.__qualname__ = cls_name
    return _Paged


PagedAdam = _quantized("PagedAdam", "fp32", adamw=False)
PagedAdamW = _quantized("PagedAdamW", "fp32", adamw=True)
PagedAdam8bit = _quantized("PagedAdam8bit", "int8", adamw=False)
PagedAdamW8bit = _quantized("PagedAdamW8bit", "int8", adamw=True)
PagedAdam.__doc__ = "Adam (L2 weight decay) with fp32 moments in a page store."
PagedAdamW.__doc__ = "AdamW with fp32 moments in a page store (weight_decay defaults to 1e-2)."
PagedAdam8bit.__doc__ = "Adam with 8-bit block-quantized moments in a page store (as Adam8bit, paged)."
PagedAdamW8bit.__doc__ = "AdamW with 8-bit block-quantized moments in a page store (as AdamW8bit, paged)."


class PagedLion(PagedOptimizer):
    """Lion with an fp32 momentum in a page store."""

    _algorithm = "lion"
    _moments = ("exp_avg",)
    _format = "fp32"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, min_8bit_size=4096, *,
                 block_size=None, maximize=False, store="cpu", nvme_path=None, page_size_mb=DEFAULT_PAGE_SIZE_MB,
                 prefetch_depth=DEFAULT_PREFETCH_DEPTH, io_threads=4, executor="auto", stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, store=store, nvme_path=nvme_path, page_size_mb=page_size_mb,
                         prefetch_depth=prefetch_depth, io_threads=io_threads, executor=executor, lr=lr,
                         betas=betas, eps=0.0, weight_decay=weight_decay, amsgrad=False, adamw_mode=True,
                         bias_correction=False,
                         maximize=maximize, stochastic_rounding=stochastic_rounding, state_format=self._format,
                         block_size=block_size, min_8bit_size=min_8bit_size, master_weights=master_weights)


class PagedLion8bit(PagedLion):
    """Lion with an 8-bit block-quantized momentum in a page store."""

    _format = "int8"
