"""The same training script (launch/train_dp.py) under torchrun, the deepspeed launcher and
mpiexec; a rank that dies or hangs ends the job instead of hanging it; the node admission
check (docs/launch.md). Each job is 2 ranks of a tiny model on CPU with gloo."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.engine import admission, launch_env
from tolerances import TRAJECTORY_REL
from offload_engine.engine.admission import AdmissionError, Demand
from multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "train_dp.py"
STEPS = 5


def _tool(name: str) -> str | None:
    """A launcher installed beside this Python (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), **extra)
    return env


def _results(cmd: list[str], env: dict, timeout: float = 120) -> list[dict]:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = [json.loads(m) for m in re.findall(r"RESULT (\{.*?\})", proc.stdout)]
    return sorted(results, key=lambda r: r["rank"])


@pytest.fixture(scope="module")
def one_process_loss() -> float:
    """The final loss of the same job in one process (world 1, the whole global batch)."""
    (result,) = _results([sys.executable, str(SCRIPT), "--steps", str(STEPS)], _env())
    assert result["world"] == 1 and result["launcher"] == "none"
    return result["final_loss"]


def _check_two_ranks(results: list[dict], launcher: str, one_process_loss: float) -> None:
    """Two ranks of one world of 2 (not two worlds of 1, which would also agree), the launcher
    recognised, and the same final loss on both: the held-out loss each rank computes on its
    own copy of the params. It matches one process on the same global batch (only the grad
    all-reduce's summation order differs)."""
    assert [(r["rank"], r["world"], r["local_rank"]) for r in results] == [(0, 2, 0), (1, 2, 1)], results
    assert all(r["launcher"].startswith(launcher) for r in results), results
    assert results[0]["pid"] != results[1]["pid"]
    assert results[0]["final_loss"] == results[1]["final_loss"]
    assert results[0]["final_loss"] == pytest.approx(one_process_loss, rel=TRAJECTORY_REL["fp32"])


# ---- each launcher ----------------------------------------------------------------------------
def test_torchrun_two_ranks(one_process_loss):
    torchrun = _tool("torchrun")
    env = _env()
    results = _results([torchrun, "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"], str(SCRIPT),
                        "--steps", str(STEPS)], env)
    _check_two_ranks(results, "torchrun", one_process_loss)


def test_deepspeed_launcher_two_ranks(one_process_loss):
    """The deepspeed launcher runs on a CPU-only machine (its CPU accelerator); it passes
    --local_rank=N, which the script's parser would refuse unless launch_env drops it."""
    deepspeed = _tool("deepspeed")
    if deepspeed is None:
        pytest.skip("the deepspeed launcher is not installed (pip install deepspeed)")
    env = _env()
    results = _results([deepspeed, "--num_gpus", "2", "--master_port", env["MASTER_PORT"], str(SCRIPT),
                        "--steps", str(STEPS)], env, timeout=180)
    _check_two_ranks(results, "deepspeed", one_process_loss)


def test_mpiexec_two_ranks(one_process_loss):
    """mpiexec sets only its own variables (MPICH's hydra: PMI_RANK, PMI_SIZE, MPI_LOCALRANKID,
    MPI_LOCALNRANKS); the master address defaults to 127.0.0.1 as both ranks are on this node."""
    mpiexec = _tool("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec is not installed (pip install mpich)")
    results = _results([mpiexec, "-n", "2", sys.executable, str(SCRIPT), "--steps", str(STEPS)], _env())
    _check_two_ranks(results, "mpi:", one_process_loss)


def test_mpiexec_without_local_rank_variables_asks_mpi4py(one_process_loss):
    """An MPI whose launcher does not say which ranks share a node: mpi4py's shared-memory
    split tells launch_env the local rank and size."""
    mpiexec = _tool("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec is not installed (pip install mpich)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py)")
    results = _results([mpiexec, "-n", "2", "env", "-u", "MPI_LOCALRANKID", "-u", "MPI_LOCALNRANKS",
                        sys.executable, str(SCRIPT), "--steps", str(STEPS)], _env())
    _check_two_ranks(results, "mpi:mpich", one_process_loss)


# ---- a rank that dies or hangs ----------------------------------------------------------------
def _start_ranks(tmp_path, **extra_env) -> list[tuple[subprocess.Popen, Path, Path]]:
    """Two ranks started as bare processes (the RANK/WORLD_SIZE environment torchrun would set)
    and no launcher, which would itself tear the job down when a rank dies: what remains to
    end the job is the engine's own behaviour."""
    env = _env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", **extra_env)
    ranks = []
    for rank in range(2):
        out, err = tmp_path / f"rank{rank}.out", tmp_path / f"rank{rank}.err"
        with open(out, "w") as fout, open(err, "w") as ferr:
            proc = subprocess.Popen([sys.executable, str(SCRIPT), "--steps", "100000", "--step-sleep", "0.02"],
                                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=ROOT,
                                    stdout=fout, stderr=ferr)
        ranks.append((proc, out, err))
    return ranks


def _wait_for(path: Path, text: str, procs, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert all(p.poll() is None for p in procs), f"a rank exited before {text!r}"
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout} s"
        time.sleep(0.1)


def _exit_code(proc: subprocess.Popen, hang_guard: float) -> int:
    """proc's exit code; a rank still running after `hang_guard` seconds is a hang (a guard
    against waiting forever, not a measurement: what ended the rank is read from its stderr)."""
    try:
        return proc.wait(timeout=hang_guard)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"rank 0 still running {hang_guard} s after its peer stopped: the job hangs")


def _signal_rank1_mid_run(tmp_path, sig, **env) -> tuple[int, str]:
    """Starts 2 ranks, sends `sig` to rank 1 at step 3; rank 0's exit code and its stderr. Both
    ranks are gone on return."""
    (p0, _, err0), (p1, out1, _) = ranks = _start_ranks(tmp_path, **env)
    try:
        _wait_for(out1, "step 3 ", [p0, p1])
        p1.send_signal(sig)
        code = _exit_code(p0, 120)
    finally:
        for p, _, _ in ranks:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()
    return code, err0.read_text()


def test_sigkilled_rank_makes_the_other_exit_with_an_error(tmp_path):
    """SIGKILL closes rank 1's sockets; rank 0's next collective raises (gloo: connection closed
    or reset by peer) and it exits non-zero: the peer's error ends it, not the collective
    timeout (600 s, which the hang guard would have caught first)."""
    code, err = _signal_rank1_mid_run(tmp_path, signal.SIGKILL)
    assert code != 0
    assert "peer" in err and "RuntimeError" in err and "Timed out" not in err, err[-2000:]


def test_hung_rank_makes_the_other_exit_after_the_collective_timeout(tmp_path):
    """SIGSTOP keeps rank 1's sockets open: only the collective timeout
    (OFFLOAD_ENGINE_DIST_TIMEOUT_S, here 5 s) ends rank 0's wait, and its error says so."""
    code, err = _signal_rank1_mid_run(tmp_path, signal.SIGSTOP, OFFLOAD_ENGINE_DIST_TIMEOUT_S="5")
    assert code != 0
    assert "Timed out" in err and "5000ms" in err, err[-2000:]


# ---- launch_env, unit by unit -----------------------------------------------------------------
@pytest.mark.parametrize("environ, argv, expected", [
    ({}, [], ("none", 0, 1, 0, 1, "127.0.0.1", 29500)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
      "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}, [], ("torchrun", 3, 4, 1, 2, "node0", 1234)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_RANK": "0", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "29500"}, ["--local_rank=1"], ("deepspeed", 1, 2, 1, 2, "127.0.0.1", 29500)),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, ["--local-rank", "1"], ("env", 1, 2, 1, None, "h", 29500)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "n0"}, [], ("mpi:openmpi", 2, 4, 0, 2, "n0", 29500)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_PORT": "4000"}, [],
     ("mpi:mpich", 1, 2, 1, 2, "127.0.0.1", 4000)),
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "1"}, [], ("mpi:mvapich", 0, 1, 0, None, "127.0.0.1", 29500)),
    # RANK/WORLD_SIZE win over MPI's variables (a launcher that sets both, or a user override).
    ({"RANK": "0", "WORLD_SIZE": "1", "PMI_RANK": "1", "PMI_SIZE": "2"}, [], ("env", 0, 1, 0, None, "127.0.0.1", 29500)),
])
def test_detect_reads_each_launchers_environment(environ, argv, expected):
    env = launch_env.detect(environ, argv)
    assert dataclasses.astuple(env) == expected


@pytest.mark.parametrize("environ, argv, message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, [], "rank 2 is not in a world of 2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, [], "LOCAL_RANK"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, [], "MASTER_ADDR is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, [], "RANK='x' is not an integer"),
    ({}, ["--local_rank=one"], "--local_rank must be an integer"),
])
def test_detect_names_the_variable_that_is_wrong(environ, argv, message):
    with pytest.raises(launch_env.LaunchError, match=message):
        launch_env.detect(environ, argv)


def test_script_args_drop_the_launchers_local_rank():
    argv = ["--steps", "3", "--local_rank=1", "--x", "--local-rank", "0", "--local_rank", "2", "y"]
    assert launch_env.script_args(argv) == ["--steps", "3", "--x", "y"]
    assert launch_env.local_rank_arg(argv) == 1


def test_apply_fills_only_what_is_missing():
    environ = {"MASTER_PORT": "7"}
    launch_env.apply(launch_env.LaunchEnv("mpi:mpich", 1, 2, 1, 2, "127.0.0.1", 29500), environ)
    assert environ == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "7"}


def test_collective_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(launch_env.TIMEOUT_ENV, raising=False)
    assert launch_env.timeout().total_seconds() == launch_env.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(launch_env.TIMEOUT_ENV, "12.5")
    assert launch_env.timeout().total_seconds() == 12.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(launch_env.TIMEOUT_ENV, bad)
        with pytest.raises(launch_env.LaunchError, match=launch_env.TIMEOUT_ENV):
            launch_env.timeout()


# ---- admission --------------------------------------------------------------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 7))


def _config(**paging) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-3}},
            "paging": {"page_size_mb": 1 / 64, **paging}}


def _allocated(**paging) -> dict:
    """What the optimizer really allocates after one step, with no limit in force."""
    engine, optimizer, _, _ = offload_engine.initialize(_model(), _config(**paging))
    engine.backward(engine(torch.randn(2, 40)).square().mean())
    engine.step()
    stats = optimizer.paging_stats()
    optimizer.close()
    return stats


@pytest.fixture
def no_limits(monkeypatch):
    monkeypatch.delenv(admission.MEMORY_ENV, raising=False)
    monkeypatch.delenv(admission.DISK_ENV, raising=False)
    return monkeypatch


def test_admission_refuses_host_state_that_does_not_fit(no_limits):
    """The check's estimate is what the host store allocates at the first step: a node with one
    byte less is refused, with the numbers and the key, and one with exactly that much admitted."""
    needed = _allocated()["store_bytes"]
    assert needed > 0
    no_limits.setenv(admission.MEMORY_ENV, str(needed - 1))
    with pytest.raises(AdmissionError) as err:
        offload_engine.initialize(_model(), _config())
    assert err.value.path == "paging.store"
    text = str(err.value)
    assert f"need {needed} bytes" in text and f"{needed - 1} bytes" in text and f"rank 0: {needed} bytes" in text
    assert "world of 1" in text and admission.MEMORY_ENV in text and "nvme" in text
    no_limits.setenv(admission.MEMORY_ENV, str(needed))
    offload_engine.initialize(_model(), _config())[1].close()


def test_admission_refuses_nvme_state_that_does_not_fit_on_disk(no_limits, tmp_path):
    """NVMe: the file holds two copies of every page ([Note: shadow pages]); host RAM holds the
    slot pool only."""
    stats = _allocated(store="nvme", nvme_path=str(tmp_path))
    disk, pool = stats["store_bytes"], stats["pool_bytes"]
    assert disk == 2 * stats["num_pages"] * stats["page_bytes"] > 0 and pool > 0
    no_limits.setenv(admission.DISK_ENV, str(disk - 1))
    with pytest.raises(AdmissionError) as err:
        offload_engine.initialize(_model(), _config(store="nvme", nvme_path=str(tmp_path)))
    assert err.value.path == "paging.nvme_path"
    assert f"need {disk} bytes" in str(err.value) and "two copies" in str(err.value) and str(tmp_path) in str(err.value)
    no_limits.setenv(admission.DISK_ENV, str(disk))
    no_limits.setenv(admission.MEMORY_ENV, str(pool - 1))  # the slot pool is the host RAM it needs
    with pytest.raises(AdmissionError, match=f"need {pool} bytes"):
        offload_engine.initialize(_model(), _config(store="nvme", nvme_path=str(tmp_path)))
    no_limits.setenv(admission.MEMORY_ENV, str(pool))
    offload_engine.initialize(_model(), _config(store="nvme", nvme_path=str(tmp_path)))[1].close()
    assert not list(tmp_path.iterdir())  # refused setups left no state file behind


def test_admission_measures_with_psutil_and_disk_usage(no_limits, tmp_path):
    """Without the overrides the figures come from psutil and shutil.disk_usage."""
    vm = type("VM", (), {"available": 1000})
    no_limits.setattr(admission.psutil, "virtual_memory", lambda: vm)
    no_limits.setattr(admission, "_cgroup_memory_left", lambda: None)
    with pytest.raises(AdmissionError, match=r"and 1000 bytes is available"):
        offload_engine.initialize(_model(), _config())
    vm.available = 1 << 40
    usage = shutil.disk_usage(tmp_path)._replace(free=2000)
    no_limits.setattr(admission.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(AdmissionError, match=r"and 2000 bytes \(1.95 KiB\) is free"):
        offload_engine.initialize(_model(), _config(store="nvme", nvme_path=str(tmp_path)))


def test_admission_counts_a_non_paged_optimizers_state_on_cpu(no_limits):
    """AdamW8bit keeps its state in tensors, not pages: 8-bit codes and absmax per moment."""
    config = {"train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW8bit", "params": {"lr": 1e-3, "min_8bit_size": 0}}}
    engine, optimizer, _, _ = offload_engine.initialize(_model(), config)
    engine.backward(engine(torch.randn(2, 40)).square().mean())
    engine.step()
    held = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)
    no_limits.setenv(admission.MEMORY_ENV, str(held - 1))
    with pytest.raises(AdmissionError, match=f"need {held} bytes"):
        offload_engine.initialize(_model(), config)


def _demand(rank, host, memory, available, disk=0, disk_id=None, free=None):
    return Demand(rank, host, memory, available, disk, "/nvme" if disk_id is not None else None, disk_id, free)


def test_check_sums_each_node_and_each_filesystem():
    """Four ranks on two nodes: the node whose two ranks together exceed its memory is named,
    though each of them alone would fit; ranks writing to different filesystems of one node
    are summed per filesystem."""
    fits = [_demand(0, "a", 60, 130), _demand(1, "a", 60, 125)]
    admission.check(fits + [_demand(2, "b", 10, 100), _demand(3, "b", 10, 100)])
    with pytest.raises(AdmissionError) as err:
        admission.check(fits + [_demand(2, "b", 60, 100), _demand(3, "b", 50, 90)])
    text = str(err.value)
    assert "node 'b'" in text and "2 rank(s) of a world of 4 need 110 bytes" in text
    assert "rank 2: 60 bytes, rank 3: 50 bytes" in text and "and 90 bytes is available" in text
    two_disks = [_demand(0, "a", 1, 10, disk=70, disk_id=1, free=100), _demand(1, "a", 1, 10, disk=70, disk_id=2,
                                                                                 free=100)]
    admission.check(two_disks)
    one_disk = [dataclasses.replace(d, disk_id=1) for d in two_disks]
    with pytest.raises(AdmissionError, match="need 140 bytes") as err:
        admission.check(one_disk)
    assert err.value.path == "paging.nvme_path"


def test_check_reports_a_rank_that_could_not_estimate():
    with pytest.raises(RuntimeError, match="rank 1 on host 'b' could not estimate .*OSError: gone"):
        admission.check([_demand(0, "a", 1, 10), Demand(1, "b", 0, 0, error="OSError: gone")])


def test_io_threads_are_shared_by_the_ranks_of_a_node():
    assert [admission.io_threads_per_rank(8, n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert admission.node_io_threads(6) == 6  # one process: the whole budget


def test_admission_refuses_two_ranks_that_fit_only_one_at_a_time(tmp_path):
    """2 ranks on this node, each of whose state alone fits the budget but not both together:
    both ranks refuse, with the same message."""
    env = _env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", **{admission.MEMORY_ENV: str(80 * 1024)})
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), "--steps", "1"], cwd=ROOT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0
        errors.append([line for line in err.splitlines() if "AdmissionError" in line][-1].split("AdmissionError: ")[1])
    assert errors[0] == errors[1]
    # train_dp.py's 10,756 fp32 params in 16 KiB pages: rank 0 owns 4,096 (2 pages), rank 1 6,660 (4 pages).
    assert ("2 rank(s) of a world of 2 need 98304 bytes (96.00 KiB) (rank 0: 32768 bytes (32.00 KiB), "
            "rank 1: 65536 bytes (64.00 KiB)), and 81920 bytes") in errors[0]
