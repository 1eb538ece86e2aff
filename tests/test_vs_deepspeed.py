"""benchmarks/vs_deepspeed.py at a tiny size: our contenders train the same job at 2 ranks and
the record has every figure the docs table needs; the fp32 runs end at the same loss. No
timing is asserted. DeepSpeed's contenders are left out here: each of their jobs takes over
10 s to start at 2 ranks on 2 cores (and minutes to JIT-build its ops on a fresh machine);
the benchmark itself runs them."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import import_benchmark
from tolerances import QUANTIZED_VS_FP32_LOSS_REL

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_deepspeed.py"
OURS = ("ours-host", "ours-nvme", "ours-8bit", "ours-nvme-delayed", "ours-nvme-exact")


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("vs_deepspeed")
    cmd = [sys.executable, str(SCRIPT), "--models", "tiny-gpt", "--contenders", ",".join(OURS), "--steps", "2",
           "--warmup", "1", "--rounds", "1", "--launcher", "torchrun", "--nvme-dir", str(out),
           "--json", str(out / "record.json"), "--plots-dir", str(out / "plots")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rec = json.loads((out / "record.json").read_text())
    rec["_stdout"], rec["_out"] = proc.stdout, out
    return rec


def test_every_contender_reports_every_figure(record):
    assert record["contenders"] == list(OURS) and not record.get("errors")
    assert record["launcher"] == "torchrun" and record["world"] == 2
    results = record["results"]["tiny-gpt"]
    assert set(results) == set(OURS)
    for name, r in results.items():
        assert r["world"] == 2 and r["params"] > 0 and r["tokens_per_step"] == 4 * 2 * 8, name
        assert r["step_ms"]["n"] == 2 and 0 < r["opt_ms"]["median"] <= r["step_ms"]["max"], name
        assert r["tokens_per_s"] > 0 and r["peak_rss_max_rank"] > 0, name
        assert r["peak_rss_sum"] >= r["peak_rss_max_rank"] and r["peak_gpu_bytes"] == 0, name
        assert set(r["state_bytes"]) == {"gpu", "host", "nvme"} and r["state_bytes"]["gpu"] == 0, name
        assert math.isfinite(r["final_loss"]) and len(r["losses"]) == 3, name
    # Where each keeps its state: host pages; an NVMe file (and a host slot pool); 8-bit host pages.
    assert results["ours-host"]["state_bytes"]["nvme"] == 0 and results["ours-host"]["state_bytes"]["host"] > 0
    assert results["ours-nvme"]["state_bytes"]["nvme"] > 0
    assert results["ours-8bit"]["optimizer"] == "PagedAdamW8bit"
    assert {results[c]["optimizer"] for c in ("ours-host", "ours-nvme")} == {"PagedAdamW"}


def test_fp32_runs_end_at_the_same_loss_and_8bit_near_it(record):
    """The host and NVMe stores run the same kernel on the same pages: the same loss bit for
    bit. 8-bit moments end within a percent after 3 steps."""
    chk = record["checks"]["tiny-gpt"]
    assert chk["loss_reference"] == "ours-host" and chk["fp32_losses_agree"]
    results = record["results"]["tiny-gpt"]
    assert results["ours-nvme"]["losses"] == results["ours-host"]["losses"]
    assert results["ours-nvme"]["final_loss"] == results["ours-host"]["final_loss"]
    assert chk["loss_rel_diff"]["ours-8bit"] < QUANTIZED_VS_FP32_LOSS_REL["int8"]
    # paging.overlap "delayed" from the first step: step 1 reads the initial params, as the
    # others do; its last update lands before the final loss, which its stale grads move.
    assert results["ours-nvme-delayed"]["losses"][0] == results["ours-host"]["losses"][0]
    assert results["ours-nvme-delayed"]["final_loss"] != results["ours-host"]["final_loss"]
    # paging.overlap "exact" at 2 ranks (grads to their owners during backward): the same job, bit for bit.
    assert results["ours-nvme-exact"]["losses"] == results["ours-host"]["losses"]
    assert results["ours-nvme-exact"]["final_loss"] == results["ours-host"]["final_loss"]
    # fp32 without clipping: nothing after backward can change the step, so none is settled
    assert results["ours-nvme-exact"]["speculation"]["steps"] == 0
    assert results["ours-host"]["speculation"] is None
    assert chk["ratios"] == {}  # no DeepSpeed anchor in this run


def _two_hosts_unavailable():
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tests"))
    from hosts import TwoHosts
    return TwoHosts.unavailable()


@pytest.mark.skipif(_two_hosts_unavailable() is not None, reason=str(_two_hosts_unavailable()))
def test_two_host_layout_reports_the_bytes_on_the_link(tmp_path):
    """--layout 2x2 (two network namespaces, 2 ranks each): the same global batch, so the fp32
    losses agree with each other; the hierarchical exchange (ours-host) sends well under what
    every rank over gloo does (ours-host-gloo; about half in theory at 2 ranks per host), and
    the table prints both and their ratio. Bytes, not times, are asserted."""
    cmd = [sys.executable, str(SCRIPT), "--models", "tiny-gpt", "--layout", "2x2", "--contenders",
           "ours-host,ours-host-gloo", "--steps", "2", "--warmup", "1", "--rounds", "1", "--launcher", "torchrun",
           "--json", str(tmp_path / "record.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["layout"] == "2x2" and rec["world"] == 4
    by = rec["results"]["tiny-gpt"]
    assert all(r["world"] == 4 and r["tokens_per_step"] == 4 * 2 * 8 for r in by.values())
    assert rec["checks"]["tiny-gpt"]["fp32_losses_agree"]
    hier, flat = by["ours-host"]["link_bytes_per_step"], by["ours-host-gloo"]["link_bytes_per_step"]
    assert 0 < hier < 0.75 * flat, (hier, flat)
    assert "tiny-gpt, 2x2: bytes on the link per step: ours-host" in proc.stdout
    assert "ours-host/ours-host-gloo: step" in proc.stdout and "link bytes" in proc.stdout


def test_table_and_plots(record):
    out = record["_stdout"]
    assert "| model | params | contender |" in out and "tiny-gpt: fp32-state losses agree" in out
    for name in ("vs_deepspeed_step.png", "vs_deepspeed_memory.png"):
        png = record["_out"] / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_checks_flag_disagreeing_losses_and_missed_targets():
    _vs_report = import_benchmark("_vs_report")

    def result(ms, loss):
        return {"step_ms": {"median": ms}, "opt_ms": {"median": ms / 2}, "final_loss": loss}
    results = {"m": {"ds-zero2-cpu": result(200.0, 1.0), "ours-host": result(90.0, 1.0 + 1e-7),
                     "ds-zero3-nvme": result(400.0, 1.0), "ours-nvme": result(250.0, 1.01)}}
    chk = _vs_report.checks(results, {"ds-zero2-cpu", "ours-host", "ds-zero3-nvme", "ours-nvme"}, 1e-4)["m"]
    assert not chk["fp32_losses_agree"] and chk["fp32_max_rel_diff"] == pytest.approx(0.01)
    assert chk["ratios"]["ours-host/ds-zero2-cpu"] == {"step": 0.45, "opt": 0.45, "target": 0.5, "met": True}
    assert chk["ratios"]["ours-nvme/ds-zero3-nvme"]["met"] is False


def test_gpu_record_redraws_with_its_own_plots_and_same_format_ratios(tmp_path):
    """The committed H100 record: --from-json prints the GPU table with ours against the
    anchor that keeps the same state in the same place, and writes the GPU plots under their
    own names (the CPU plots in docs/img are not overwritten)."""
    saved = ROOT / "docs" / "img" / "vs_deepspeed_gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_deepspeed.py"), "--from-json", str(saved),
                           "--plots-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(saved.read_text())
    by = record["results"]["gpt-350m"]
    want = by["gpu-ours-host"]["step_ms"]["median"] / by["gpu-torchao-offload"]["step_ms"]["median"]
    assert f"gpu-ours-host/gpu-torchao-offload: step {want:.2f}x" in proc.stdout
    assert "gpu-ours-host-8bit/gpu-bnb-paged8: step" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vs_deepspeed_gpu_memory.png", "vs_deepspeed_gpu_step.png"]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_run_job_removes_the_deepspeed_shm_buffers_its_ranks_left(monkeypatch, tmp_path):
    """DeepSpeed's CPU all-reduce never unlinks its per-rank /dev/shm buffers; the benchmarks'
    job runner removes the ones that appeared during the job (also when it failed) and leaves
    the ones that were there before. SHM_DIR points at a scratch folder so no real buffer is
    touched."""
    _ranks = import_benchmark("_ranks")
    monkeypatch.setattr(_ranks, "SHM_DIR", str(tmp_path))
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_"
    (tmp_path / f"{prefix}1_0").write_bytes(b"x")             # an earlier job's: stays
    (tmp_path / "deepspeed_allreduce_buffer_other").write_bytes(b"x")  # not this user's pattern: stays
    for code in (0, 3):
        new = tmp_path / f"{prefix}2_{code}"
        child = f"open({str(new)!r}, 'wb').write(b'x'); raise SystemExit({code})"
        assert _ranks.run_job([sys.executable, "-c", child], dict(os.environ), 60) == code
        assert not new.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"deepspeed_allreduce_buffer_other", f"{prefix}1_0"}
