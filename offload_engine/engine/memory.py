"""What the engine's training state occupies, and where: params (all, and trainable), grads,
the optimizer state (host RAM, NVMe file, device memory) and the process's resident memory.
For LoRA-style fine-tuning it shows the point of passing only trainable params: state exists
for those alone."""
from __future__ import annotations

import psutil
import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _optimizer_state(optimizer) -> dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with_state = [p for p in params if optimizer.state.get(p)]
    out = {"class": type(optimizer).__name__, "params": len(params), "params_with_state": len(with_state),
           "elements_with_state": sum(p.numel() for p in with_state)}
    stats = getattr(optimizer, "paging_stats", None)
    if stats is not None:
        s = stats()
        out.update(store=s["store"], path=s["path"], state_bytes=s["state_bytes"], store_bytes=s["store_bytes"],
                   pool_bytes=s["pool_bytes"], device_pool_bytes=s["device_pool_bytes"],
                   pinned_host_bytes=s["pinned_host_bytes"], page_bytes=s["page_bytes"], num_pages=s["num_pages"])
        return out
    by_device: dict = {}
    for p in with_state:
        for key, value in optimizer.state[p].items():
            if isinstance(value, torch.Tensor) and key != "step":
                by_device[str(value.device)] = by_device.get(str(value.device), 0) + _nbytes(value)
    out.update(store="memory", state_bytes=sum(by_device.values()), state_bytes_by_device=by_device)
    return out


def memory_report(engine) -> dict:
    """A dict of byte counts (see the module docstring); format_memory_report() prints it."""
    params = list(engine.module.parameters())
    trainable = [p for p in params if p.requires_grad]
    by_device: dict = {}
    for p in params:
        by_device[str(p.device)] = by_device.get(str(p.device), 0) + _nbytes(p)
    report = {
        "params": {"count": sum(p.numel() for p in params), "bytes": sum(_nbytes(p) for p in params),
                   "trainable_count": sum(p.numel() for p in trainable),
                   "trainable_bytes": sum(_nbytes(p) for p in trainable), "bytes_by_device": by_device,
                   "dtype": sorted({str(p.dtype).replace("torch.", "") for p in params})},
        "grads_bytes": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": _optimizer_state(engine.optimizer),
        "process_rss_bytes": psutil.Process().memory_info().rss,
    }
    if engine.delayed is not None:  # paging.overlap "delayed": the host copies its updates write
        report["delayed_param_copy_bytes"] = engine.delayed.shadow_bytes
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        report["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_memory_report(report: dict) -> str:
    p, o = report["params"], report["optimizer"]
    lines = [
        f"params      {p['count']:,} ({_mib(p['bytes'])}, {'/'.join(p['dtype'])}); trainable {p['trainable_count']:,} "
        f"({_mib(p['trainable_bytes'])})",
        f"grads       {_mib(report['grads_bytes'])}",
        f"optimizer   {o['class']}: state for {o['params_with_state']} of {o['params']} params "
        f"({o['elements_with_state']:,} elements), {_mib(o['state_bytes'])} in {o['store']}"
        + (f" ({o['path']})" if o.get("path") else ""),
    ]
    if "pool_bytes" in o:
        lines.append(f"            page pool {_mib(o['pool_bytes'])} host, {_mib(o['device_pool_bytes'])} device; "
                     f"{o['num_pages']} pages of {_mib(o['page_bytes'])}")
    if "delayed_param_copy_bytes" in report:
        lines.append(f"delayed     param copies {_mib(report['delayed_param_copy_bytes'])} host")
    lines.append(f"process     RSS {_mib(report['process_rss_bytes'])}"
                 + (f"; CUDA allocated {_mib(report['cuda_allocated_bytes'])}" if "cuda_allocated_bytes" in report
                    else ""))
    return "\n".join(lines)
