"""Paged optimizers: the moments live in a page store (host RAM or an NVMe file) and are moved
a page at a time through a bounded slot pool to the update kernels and back: the SIMD CPU
kernels for CPU params (or, with ``executor="cpu"``, for CUDA params through pinned copies:
paging/executors/cpu_for_cuda.py), the CUDA kernels through device slots for CUDA params
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

import functools

import torch

from ..paging import page_bytes_from_mb
from ..paging.pager import Pager, PagerSpec, copy_states_into
from ..paging.stores import store_names
from ..quant import FORMATS, codec
from . import sharded
from ._base import _SIGNED, BlockwiseOptimizer
from .paged_step import _PagedStep

STORES = store_names()  # "cpu", "nvme", "managed" (paging/stores.py's registry)
EXECUTORS = ("auto", "cpu", "cuda", "hybrid")  # auto: the params' device
DEFAULT_PAGE_SIZE_MB = 16
DEFAULT_PREFETCH_DEPTH = 2


class PagedOptimizer(BlockwiseOptimizer):
    """A BlockwiseOptimizer whose moments live in pages of a store (module docstring). It keeps
    param groups, per-param jobs and state_dict translation; the pages are its Pager's
    (paging/pager.py), reached through ``self.pager``'s public methods only."""

    def __init__(self, params, *, store="cpu", nvme_path=None, page_size_mb=DEFAULT_PAGE_SIZE_MB,
                 prefetch_depth=DEFAULT_PREFETCH_DEPTH, io_threads=4, executor="auto", gpu_fraction=None,
                 rebalance=None, **settings):
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
        # CUDA params by the CUDA kernels through device slots (paging/executors/).
        device = _params_device(self.param_groups, name)
        # `executor` may also be an Executor object (paging/executors/), e.g. a HybridExecutor
        # of two CPU executors in tests; its name stands for it in the checks below.
        given = None if isinstance(executor, str) else executor
        if given is not None:
            executor = getattr(given, "name", None)
        if executor not in EXECUTORS:
            raise ValueError(f"{name}: executor must be one of {', '.join(map(repr, EXECUTORS))}; got "
                             f"executor={executor!r}")
        if executor == "auto":
            executor = "cpu" if device.type == "meta" else device.type
        if executor in ("cuda", "hybrid") and device.type not in ("cuda", "meta") and given is None:
            what = ("updates CUDA params" if executor == "cuda" else
                    "splits each step between the GPU (CUDA kernels) and the CPU (SIMD kernels) and needs CUDA "
                    "params")
            raise ValueError(f"{name}: executor={executor!r} {what}; the params are on {device}. Use "
                             "executor='cpu' (or 'auto')")
        if store == "managed" and executor != "cuda":
            raise ValueError(f"{name}: store='managed' (CUDA managed memory) is updated by the CUDA executor; got "
                             f"executor={executor!r} with params on {device}. Use store='cpu' or 'nvme'")
        if executor == "hybrid" and store != "cpu":
            raise ValueError(f"{name}: executor='hybrid' updates some pages in host memory in place, beside the "
                             f"GPU's; it needs store='cpu' (got store={store!r})")
        if gpu_fraction is not None and (isinstance(gpu_fraction, bool) or not isinstance(gpu_fraction, (int, float))
                                         or not 0.0 <= gpu_fraction <= 1.0):
            raise ValueError(f"{name}: gpu_fraction must be a number in [0, 1] (the share of a step's pages the "
                             f"hybrid executor updates on the GPU) or None; got gpu_fraction={gpu_fraction!r}")
        if gpu_fraction is not None and executor != "hybrid":
            raise ValueError(f"{name}: gpu_fraction is the hybrid executor's split; the executor is {executor!r}")
        if rebalance is None:
            rebalance = gpu_fraction is None  # a split the user set stays where it is
        self.pager = Pager(PagerSpec(store=store, executor=executor, device=device, page_bytes=page_bytes,
                                     prefetch_depth=prefetch_depth, io_threads=io_threads, nvme_path=nvme_path,
                                     gpu_fraction=0.5 if gpu_fraction is None else float(gpu_fraction),
                                     rebalance=bool(rebalance)), given)
        self._device = device
        self._keys: dict = {}          # param -> key (its index in the flat param order)
        # Overlapped steps opened with early="kept" or "none", by how settle() found them
        # ([Note: speculative step] in paged_step.py); reported by paging_stats().
        self._speculation = {"steps": 0, "kept": 0, "redo": 0, "skipped": 0, "waited": 0, "peak_kept_bytes": 0}

    # ---- layout ---------------------------------------------------------------------------
    def _layout_entries(self, wanted, keys: dict) -> list:
        """[(group index, [(key, local numel, StateFormat)])] for the params in `wanted`;
        records their keys in `keys`."""
        wanted_ids = {id(p) for p in wanted}
        groups, flat_index = [], 0
        for gi, group in enumerate(self.param_groups):
            entries = []
            for p in group["params"]:
                if id(p) in wanted_ids:
                    keys[p] = flat_index
                    # A sharded param's pages hold its local shard ([Note: sharded params] in sharded.py).
                    entries.append((flat_index, sharded.local_numel(p), self.state_format_for(group, p)))
                flat_index += 1
            if entries:
                groups.append((gi, entries))
        return groups

    def planned_pages(self) -> int:
        """Pages once every trainable param has state ([Note: lazy layout]); nothing is laid out."""
        wanted = [p for g in self.param_groups for p in g["params"] if p.requires_grad and p not in self._keys]
        return self.pager.plan(self._layout_entries(wanted, dict(self._keys))).num_pages

    def planned_footprint(self):
        """Bytes per tier once every trainable param has state ([Note: lazy layout]), and the
        bytes held now: what the admission check weighs (paging/footprint.py) and what the
        planner predicts (plan/footprint.py, on meta params)."""
        return self.pager.footprint(self.planned_pages()), self.pager.held()

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
        keys = dict(self._keys)
        groups = self._layout_entries(wanted, keys)
        params = {key: p for p, key in keys.items()}

        def initial(page, buf):
            _fill_initial(page, buf, params=params)
            copy_states_into(page, buf, states or {})

        # The new pages get their initial state before the layout is adopted: if a write fails,
        # the optimizer keeps the old layout.
        new_pages = self.pager.extend(groups, initial)
        self._keys = keys
        return new_pages

    def _key_of(self, param) -> int:
        try:
            return self._keys[param]
        except KeyError:
            raise KeyError(f"{type(self).__name__}: that tensor is not a param of this optimizer (or has no state "
                           "yet)") from None

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
        if not self.pager.ready:  # no param has state yet (none has had a grad): nothing to update
            return loss
        run = _PagedStep(self, grad_scale)
        run.ready(with_grads)
        run.close()
        return loss

    def begin_overlapped_step(self, grad_scale: float = 1.0, early: str = "all",
                              retain_bytes: int = 0) -> "_PagedStep | None":
        """Opens a step whose pages are updated while backward still runs ([Note: overlapped
        step]): call ``ready(params)`` when their grads are final (post-accumulate-grad hooks),
        ``close()`` after backward, or ``abort(why)`` to drop it. `early` says which pages may
        run before backward ends: "all" (`grad_scale` is the step's, whatever the grads),
        "kept" (a guess: pages whose pre-step bytes fit in `retain_bytes` of host memory run
        and are kept; ``settle(grad_scale)`` after backward keeps or takes them back) or "none"
        (pages wait for settle()) ([Note: speculative step]). Returns None when this optimizer
        cannot overlap (no pages laid out yet, or the CPU executor with CUDA params); step()
        then does it all."""
        if early not in ("all", "kept", "none"):
            raise ValueError(f"early must be 'all', 'kept' or 'none', got {early!r}")
        if not self.pager.ready or not self.pager.executor.overlaps:
            return None
        self._check_can_step(grad_scale)
        return _PagedStep(self, grad_scale, overlapped=True, early=early, retain_bytes=retain_bytes)

    def begin_detached_step(self, grad_scale: float, into: dict) -> "_PagedStep | None":
        """The step of the params with grads now, its updates writing ``into[param]`` (a
        contiguous tensor shaped as the param's local shard) instead of the param: the jobs
        (grads, step counts, lr and the other hyperparameters) are taken now, and no page runs
        until ``close()``, which may run on another thread while the params are read elsewhere
        ([Note: detached step]). Returns None when no param has state (nothing to update)."""
        reason = self.detached_step_refusal
        if reason is not None:
            raise ValueError(f"{type(self).__name__}: {reason}")
        self._check_can_step(grad_scale)
        with_grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        missing = [p for p in with_grads if p not in into]
        if missing:
            raise ValueError(f"begin_detached_step: `into` has no tensor for a param of shape {list(missing[0].shape)}")
        self._ensure_layout(with_grads)  # now: a layout decided on the other thread would see later lr
        if not self.pager.ready:
            return None
        run = _PagedStep(self, grad_scale, into=into, hold=True)
        run.ready(with_grads)
        return run

    @property
    def detached_step_refusal(self) -> str | None:
        """Why begin_detached_step() cannot run here, or None: it needs the CPU executor with
        CPU params (the CUDA pipeline's streams are ordered against the caller's stream, which
        another thread does not have)."""
        if self.pager.executor.name != "cpu" or self._device.type != "cpu":
            return (f"a detached step runs on the CPU executor with CPU params; this optimizer has executor "
                    f"{self.pager.executor.name!r} with params on {self._device}")
        return None

    @property
    def can_restore_pages(self) -> bool:
        """Whether an overlapped step's early pages can be taken back (begin_overlapped_step's
        early="kept"): the update writes the stored pages themselves, so host copies of their
        pre-step bytes restore them."""
        return self.pager.restorable

    def note_speculation(self, outcome: str, peak_kept_bytes: int) -> None:
        """Counts a settled step (paged_step.py calls it): "kept", "redo", "skipped" or "waited"."""
        spec = self._speculation
        spec["steps"] += 1
        spec[outcome] += 1
        spec["peak_kept_bytes"] = max(spec["peak_kept_bytes"], peak_kept_bytes)

    def _check_can_step(self, grad_scale: float) -> None:
        if self._device.type == "meta":
            raise RuntimeError(f"{type(self).__name__} was built on meta params, which have shapes and no values: "
                               "it can plan a footprint (planned_footprint) and cannot step")
        self._check_not_failed()
        self._check_step_inputs(grad_scale)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.device != self._device:
                    raise ValueError(f"{type(self).__name__} pages state to one device's executor ({self._device}); "
                                     f"a param of shape {list(p.shape)} is on {p.device}")

    def paging_stats(self) -> dict:
        """The last step's paging figures (bytes read/written, seconds in fetch, update,
        write-back and waiting, slot occupancy), totals over all steps, and where the state
        lives (store, file, page and pool sizes, bytes at rest, bytes per tier), and how
        speculative overlapped steps went ("speculation": hit_rate = kept / (kept + redo +
        skipped), the steps whose early pages stood; kept_pool_bytes, the page copies held
        between steps for the next one's, and kept_buffers_made, how many were allocated)."""
        spec = dict(self._speculation)
        spec["kept_pool_bytes"] = self.pager.keep_pool_bytes
        spec["kept_buffers_made"] = self.pager.keep_buffers_made
        guessed = spec["kept"] + spec["redo"] + spec["skipped"]
        spec["hit_rate"] = spec["kept"] / guessed if guessed else None
        return {**self.pager.stats(), "speculation": spec}

    def close(self) -> None:
        """Releases the store (for NVMe: deletes the state file). The optimizer is unusable after."""
        self.pager.close()

    # ---- copies ---------------------------------------------------------------------------
    def __getstate__(self):
        """BlockwiseOptimizer's, plus the pager's spec and every laid-out param's state arrays
        read from the pages: a copy (copy.deepcopy, pickle) builds a pager of its own from the
        spec, with its own pages and, on NVMe, its own file in the same directory, holding the
        same bytes."""
        if self._device.type == "meta":
            raise RuntimeError(f"{type(self).__name__} was built on meta params to plan a footprint; it holds no "
                               "state to copy")
        state = super().__getstate__()
        params = [p for g in self.param_groups for p in g["params"]]
        laid_out = [p for p in params if p in self._keys]
        read = self.pager.read_states([self._keys[p] for p in laid_out])
        state["_paged"] = {"spec": self.pager.spec, "device": self._device, "speculation": dict(self._speculation),
                           "arrays": [(p, read[self._keys[p]]) for p in laid_out]}
        return state

    def __setstate__(self, state):
        paged = state.pop("_paged", None)
        super().__setstate__(state)
        if paged is None:  # torch.optim's load_state_dict sets state and groups through here too
            return
        self.pager = Pager(paged["spec"])
        self._device, self._speculation, self._keys = paged["device"], paged["speculation"], {}
        index = {id(p): key for key, p in enumerate(p for g in self.param_groups for p in g["params"])}
        arrays = {index[id(p)]: {name: t.reshape(-1) for name, t in a.items()} for p, a in paged["arrays"]}
        self._ensure_layout([p for p, _ in paged["arrays"]], arrays)

    # ---- state access -----------------------------------------------------------------------
    def _state_arrays(self, param, state: dict) -> dict:
        key = self._key_of(param)
        return {**state, **self.pager.read_states([key])[key]}

    def _add_state_arrays(self, states: dict, params: list) -> None:
        """state_dict() as the unpaged optimizers' (same keys, formats and tensors): the arrays
        are read from the pages."""
        with_state = [key for key, p in enumerate(params) if self.state.get(p) and p in self._keys]
        for key, arrays in self.pager.read_states(with_state).items():
            fp32 = states[key]["format"] == "fp32"
            shape = sharded.local(params[key]).shape
            for name, tensor in arrays.items():
                as_param = fp32 or name == "master"  # full-size arrays take the param's shape
                states[key][name] = tensor.view(shape) if as_param else tensor

    def load_state_dict(self, state_dict):
        if self._device.type == "meta":
            raise RuntimeError(f"{type(self).__name__} was built on meta params to plan a footprint; it holds no state "
                               "to load into")
        before = {p: dict(s) for p, s in self.state.items()}
        groups_before = [dict(g) for g in self.param_groups]
        failed_before = self.failed
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
            fmt = self.state_format_for(group, p)
            states[key] = {name: state[name].reshape(-1) for name, _, _ in fmt.arrays(sharded.local_numel(p))}
        keys_before = self._keys
        try:
            # Params without pages get them now, written once with their loaded state
            # ([Note: lazy layout]); the pages already laid out are rewritten in place.
            new_pages = self._ensure_layout([params[key] for key in states], states)
            by_key = {key: p for p, key in self._keys.items()}
            self.pager.write_states(states, fresh, functools.partial(_fill_initial, params=by_key),
                                    skip_pages=new_pages)
        except BaseException:
            self.state.clear()
            self.state.update(before)
            for group, saved in zip(self.param_groups, groups_before):  # lr, betas, ... as before
                group.clear()
                group.update(saved)
            self._keys = keys_before
            if failed_before:
                self.mark_failed(failed_before)
            raise
        for key, p in enumerate(params):  # the moments now live in the pages: keep only metadata
            state = self.state.get(p)
            if state:
                for name, _, _ in self.state_format_for(groups_of[key][0], p).arrays(sharded.local_numel(p)):
                    state.pop(name, None)


def _params_device(param_groups, name: str) -> torch.device:
    """The one device all params are on (CPU, or one CUDA device)."""
    devices = {p.device for g in param_groups for p in g["params"]}
    if len(devices) > 1:
        raise ValueError(f"{name}: all params must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    # Meta params (shapes only) make an optimizer that plans footprints and never steps.
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name}: params on {device} are not supported (CPU or CUDA)")
    return device


@functools.lru_cache(maxsize=None)
def _zero_code_byte(fmt_name: str, signed: bool) -> int:
    f = FORMATS[fmt_name]
    codes, _ = codec.quantize_blockwise(torch.zeros(128), f, signed, 128)
    return int(codes[0])


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
