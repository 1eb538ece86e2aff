"""A real two-host job on this machine (tests/hosts.py: two network namespaces on a veth link,
each with its own host name and /dev/shm): torchrun's rendezvous across them, ranks grouped by
host name, the result against one process. Skipped where namespaces cannot be made (not root)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hosts import TwoHosts
from multirank import launch_ranks
from test_data_parallel import _departures

TESTS = Path(__file__).parent
JOB = TESTS / "dp_job.py"
PORT = 29511  # each test's namespaces are new: nothing else listens there

pytestmark = pytest.mark.skipif(TwoHosts.unavailable() is not None, reason=str(TwoHosts.unavailable()))


def _env(host) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": host.ifname,
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}


def start_torchrun(hosts, per_host: int, job: Path, out: Path, *args, env=None) -> list[subprocess.Popen]:
    """`job --out out *args` by torchrun on every host (--nnodes len(hosts), node_rank its
    index), the rendezvous at the first host's veth address; torchrun's process on each host,
    each the leader of a session of its own."""
    procs = []
    for node_rank, host in enumerate(hosts):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", len(hosts), "--node-rank", node_rank,
               "--nproc-per-node", per_host, "--master-addr", hosts[0].address, "--master-port", PORT,
               job, "--out", out, *args]
        procs.append(host.popen(cmd, env={**_env(host), **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs


def torchrun_on(hosts, per_host: int, out: Path, *args, job: Path = JOB, timeout=300) -> list[dict]:
    """start_torchrun to the end; each rank's result file."""
    for proc in start_torchrun(hosts, per_host, job, out, *args):
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-4000:]
    world = per_host * len(hosts)
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("name, fmt", [("PagedAdamW", "fp32"), ("PagedAdamW8bit", "int8")])
def test_two_hosts_by_torchrun_match_one_process(tmp_path, name, fmt):
    """2 hosts x 2 ranks, rendezvous over the veth link: every step's loss and grad norm and the
    final params within the data-parallel tolerances of one process on the same global batch;
    the ranks of a host share params and ranks on different hosts do not (the hierarchical
    exchange, [Note: hierarchical exchange]); each host's IO budget is shared by its own ranks
    ([Note: node IO]); and nothing is left in either host's /dev/shm."""
    single = launch_ranks(JOB, 1, tmp_path / "w1", "--optimizer", name, rank_env=False)[0]
    with TwoHosts() as hosts:
        ranks = torchrun_on(hosts, 2, tmp_path / "w4", "--optimizer", name)
        leftovers = [h.run(["ls", "-A", "/dev/shm"]).stdout.split() for h in hosts]
    assert _departures(single, ranks, fmt) == []
    for r in ranks:
        assert r["result"]["world"] == 4 and r["result"]["transport"] == "hierarchical", r["result"]["transport"]
        # one copy of the params per host: rank 0's change reaches host a's ranks (0 and 1) only
        assert r["result"]["seen_rank0_change"] == (r["result"]["rank"] < 2)
        assert r["result"]["io_threads_of_4"] == 2  # each host's IO budget split by its own 2 ranks
    for key in single["params"]:
        assert all(torch.equal(ranks[0]["params"][key], r["params"][key]) for r in ranks[1:]), key
    held = [r["result"]["elements_with_state"] for r in ranks]
    assert sum(held) == single["result"]["elements_with_state"]
    assert leftovers == [[], []], leftovers


def test_admission_names_the_host_that_does_not_fit(tmp_path):
    """Each node's ranks are weighed against that node's memory: with host b short of memory
    (its ranks read 1 KB available) every rank of both hosts refuses to start, naming host b."""
    from offload_engine.engine.admission import MEMORY_ENV
    with TwoHosts() as hosts:
        procs = []
        for node_rank, host in enumerate(hosts):
            env = _env(host)
            if node_rank == 1:
                env[MEMORY_ENV] = "1000"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", 2, "--node-rank", node_rank,
                   "--nproc-per-node", 2, "--master-addr", hosts[0].address, "--master-port", PORT,
                   JOB, "--out", tmp_path / "w4", "--steps", 1]
            procs.append(host.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errs = [p.communicate(timeout=300)[1] for p in procs]
        names = [h.name for h in hosts]
    assert all(p.returncode != 0 for p in procs)
    for err in errs:
        assert f"does not fit in host memory on node {names[1]!r}: its 2 rank(s) of a world of 4" in err, err[-3000:]
        assert f"node {names[0]!r}" not in err


# What a surviving host takes to give up (docs/launch.md, "Two hosts"): a lost peer's socket is
# seen at once; a cut link only by the collective timeout, set to 30 s here.
FAULT_BOUND_S = 90


def _start_long_job(hosts, out):
    return start_torchrun(hosts, 2, JOB, out, "--steps", 100000, env={"OFFLOAD_ENGINE_DIST_TIMEOUT_S": "30"})


def _wait_running(host, count: int, deadline_s: float = 60.0, job: str = "dp_job.py") -> None:
    """Until `count` `job` processes run on `host` (its ranks started training)."""
    import time
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if len(_jobs_on(host, job)) >= count:
            time.sleep(3)  # past initialize(): in the step loop
            return
        time.sleep(0.2)
    raise AssertionError(f"the ranks did not start on {host.name}")


def _jobs_on(host, job: str = "dp_job.py") -> list[int]:
    """Pids of `job` processes (not their torchrun) in `host`'s network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if job.encode() in cmdline and b"torch.distributed.run" not in cmdline:
                out.append(int(pid))
        except OSError:
            pass  # it ended meanwhile
    return out



@pytest.mark.parametrize("fault", ["kill-host", "cut-link"])
def test_a_lost_host_ends_the_other_within_a_bound(tmp_path, fault):
    """All ranks of host a killed (SIGKILL), or the veth link set down mid-step: host b's
    ranks exit non-zero within FAULT_BOUND_S, never hang, and leave no process and no /dev/shm
    file behind."""
    import signal
    import time
    harness = TwoHosts()
    with harness as hosts:
        a, b = hosts
        procs = _start_long_job(hosts, tmp_path / "w4")
        try:
            _wait_running(a, 2)
            _wait_running(b, 2)
            t0 = time.monotonic()
            if fault == "kill-host":
                os.killpg(procs[0].pid, signal.SIGKILL)
                for pid in _jobs_on(a):
                    os.kill(pid, signal.SIGKILL)
            else:
                harness.link(up=False)
            procs[1].communicate(timeout=FAULT_BOUND_S)
            took = time.monotonic() - t0
            assert procs[1].returncode != 0
            assert took < FAULT_BOUND_S
            time.sleep(1)
            assert _jobs_on(b) == []
            assert b.run(["ls", "-A", "/dev/shm"]).stdout.split() == []
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.communicate()


# ---- checkpoints across hosts ([Note: world-size-free checkpoints] in engine/reshard.py) ---------
CKPT_JOB = TESTS / "dp_ckpt_job.py"
SAVE_AT, STEPS, GLOBAL_MICRO = 3, 6, 12  # 12 splits over 4, 3 and 1 ranks


def test_a_checkpoint_saved_at_two_hosts_loads_at_three_ranks_and_at_one(tmp_path):
    """Saved at 2 hosts x 2 ranks (step 3 of 6), loaded at 3 ranks on one host and in one
    process: the state the new ranks hold is the saved state, bit for bit, the step and lr are
    the saved ones, and continuing to step 6 matches the uninterrupted two-host run within the
    fp32 trajectory bound."""
    from test_dp_checkpoint import alone, assert_params_close, assert_same_state, launch, stitched
    from tolerances import TRAJECTORY_PARAM_MAX_REL
    common = ("--global-micro", GLOBAL_MICRO, "--steps", STEPS)
    with TwoHosts() as hosts:
        saved = torchrun_on(hosts, 2, tmp_path / "w4", *common, "--save", tmp_path / "ckpt", "--save-at", SAVE_AT,
                            job=CKPT_JOB)
    resumed = {"w3": launch(3, tmp_path / "w3", *common, "--load", tmp_path / "ckpt"),
               "w1": [alone(*common, "--load", tmp_path / "ckpt")]}
    for name, ranks in resumed.items():
        assert_same_state(stitched(ranks, "loaded"), stitched(saved, "saved"))
        for r in ranks:
            assert r["loaded"]["global_steps"] == SAVE_AT and r["loaded"]["lr"] == saved[0]["saved"]["lr"], name
            assert r["global_steps"] == STEPS and r["lr"] == saved[0]["lr"], name
            assert_params_close(r["params"], saved[0]["params"], rel=TRAJECTORY_PARAM_MAX_REL["fp32"])


def test_a_job_restarted_after_a_lost_host_resumes_from_its_last_checkpoint(tmp_path):
    """A two-host job saving every 5 steps loses host a (SIGKILL) after a few saves: host b's
    ranks end, and the job started again on both hosts loads the last complete checkpoint (the
    `latest` a save moves only once every rank's file is in) and continues from its step;
    where it ends matches one process run straight to that step, within the fp32 trajectory
    bound."""
    import signal
    import time
    from offload_engine.engine import checkpoint as ckpt
    from test_dp_checkpoint import alone, assert_params_close
    from tolerances import TRAJECTORY_PARAM_MAX_REL
    save = tmp_path / "ckpt"
    common = ("--global-micro", GLOBAL_MICRO, "--save", save)
    with TwoHosts() as hosts:
        procs = start_torchrun(hosts, 2, CKPT_JOB, tmp_path / "long", *common, "--steps", 100000,
                               "--save-every", 5, "--pace-s", 0.05, env={"OFFLOAD_ENGINE_DIST_TIMEOUT_S": "30"})
        try:
            end = time.monotonic() + 120
            while time.monotonic() < end and not (save / "latest").exists():
                time.sleep(0.2)
            time.sleep(2)  # a few more saves
            os.killpg(procs[0].pid, signal.SIGKILL)
            for pid in _jobs_on(hosts[0], "dp_ckpt_job.py"):
                os.kill(pid, signal.SIGKILL)
            procs[1].communicate(timeout=FAULT_BOUND_S)
            assert procs[1].returncode != 0
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
        last = ckpt.resolve_tag(save, None)
        step = int(last.name.removeprefix("global_step"))
        assert step >= 5 and step % 5 == 0, last
        again = torchrun_on(hosts, 2, tmp_path / "again", *common, "--load", save, "--steps", step + 3,
                            job=CKPT_JOB)
    straight = alone("--global-micro", GLOBAL_MICRO, "--steps", step + 3)
    for r in again:
        assert r["loaded"]["global_steps"] == step and r["global_steps"] == step + 3
        assert_params_close(r["params"], straight["params"], rel=TRAJECTORY_PARAM_MAX_REL["fp32"])


# ---- the other launchers across the hosts ---------------------------------------------------------
TRAIN_DP = TESTS.parent / "launch" / "train_dp.py"


def _train_dp_alone() -> float:
    """launch/train_dp.py's final loss in one process (the whole global batch)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, str(TRAIN_DP), "--steps", "5"], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return _results_of(done.stdout)[0]["final_loss"]


def _results_of(stdout: str) -> list[dict]:
    import json
    import re
    return [json.loads(m) for m in re.findall(r"RESULT (\{.*?\})", stdout)]


def _check_four_ranks(results: list[dict], hosts, launcher: str, alone_loss: float) -> None:
    """One world of 4 over the two hosts, 2 ranks each, the launcher recognised, the ranks of a
    host sharing params (the hierarchical exchange), and one process's loss."""
    from tolerances import TRAJECTORY_REL
    results = sorted(results, key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["local_rank"], r["host"]) for r in results] == \
        [(0, 4, 0, hosts[0].name), (1, 4, 1, hosts[0].name), (2, 4, 0, hosts[1].name), (3, 4, 1, hosts[1].name)]
    assert all(r["launcher"].startswith(launcher) and r["transport"] == "hierarchical" for r in results), results
    assert len({r["final_loss"] for r in results}) == 1
    assert results[0]["final_loss"] == pytest.approx(alone_loss, rel=TRAJECTORY_REL["fp32"])


def _tool(name: str):
    import shutil
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def test_the_deepspeed_launcher_with_a_hostfile_runs_over_both_hosts(tmp_path):
    """`deepspeed --hostfile H --no_ssh --node_rank R --master_addr A` on each host, the
    hostfile naming both (DeepSpeed's way to start nodes without ssh)."""
    deepspeed = _tool("deepspeed")
    if deepspeed is None:
        pytest.skip("the deepspeed launcher is not installed (pip install deepspeed)")
    alone_loss = _train_dp_alone()
    with TwoHosts() as hosts:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{h.name} slots=2\n" for h in hosts))
        procs = [host.popen([deepspeed, "--hostfile", hostfile, "--no_ssh", "--node_rank", node_rank,
                             "--master_addr", hosts[0].address, "--master_port", PORT, TRAIN_DP, "--steps", 5],
                            env=_env(host), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node_rank, host in enumerate(hosts)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-4000:]
            results += _results_of(out)
        _check_four_ranks(results, hosts, "deepspeed", alone_loss)


def test_mpiexec_starts_ranks_on_both_hosts(tmp_path):
    """MPICH's mpiexec on host a with both hosts in -hosts; its ssh launcher is tests/ns_ssh.py,
    which enters the named host's namespaces (no ssh daemon, nothing outside the test's
    namespaces). The master address and the gloo interface go to every rank with -genv."""
    mpiexec = _tool("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec is not installed (pip install mpich)")
    alone_loss = _train_dp_alone()
    with TwoHosts() as hosts:
        a = hosts[0]
        env = {**_env(a), "NS_SSH_HOSTS": ",".join(f"{h.name}={h.holder.pid}" for h in hosts)}
        cmd = [mpiexec, "-hosts", ",".join(f"{h.name}:2" for h in hosts), "-n", 4,
               "-launcher", "ssh", "-launcher-exec", TESTS / "ns_ssh.py", "-iface", a.ifname,
               "-genv", "MASTER_ADDR", a.address, "-genv", "MASTER_PORT", PORT,
               "-genv", "GLOO_SOCKET_IFNAME", a.ifname, sys.executable, TRAIN_DP, "--steps", 5]
        proc = a.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
        _check_four_ranks(_results_of(out), hosts, "mpi:mpich", alone_loss)
