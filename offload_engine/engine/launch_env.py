"""Which launcher started this process, and the torch.distributed environment that follows.

The same training script runs unchanged under torchrun, the ``deepspeed`` launcher and
mpirun/mpiexec (docs/launch.md). They announce a process's place in the job differently:

- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
- the ``deepspeed`` launcher sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK,
  MASTER_ADDR, MASTER_PORT, and also passes ``--local_rank=N`` on the script's command line.
- mpirun/mpiexec sets only its own variables: Open MPI OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,
  LOCAL_SIZE}; MPICH (the ``mpich`` wheel's hydra) and Intel MPI PMI_RANK, PMI_SIZE,
  MPI_LOCALRANKID, MPI_LOCALNRANKS; MVAPICH2 MV2_COMM_WORLD_*. No master address: it is
  127.0.0.1 when every rank is on this node, otherwise rank 0's host name, broadcast with
  mpi4py (or MASTER_ADDR, when the job sets it).

``detect()`` reads these (RANK/WORLD_SIZE first, so an explicit setting wins over MPI's),
``apply()`` writes the torch.distributed names into the environment, and
``init_distributed()`` does both and starts the process group with a bounded collective
timeout ([Note: collective timeout]). ``initialize()`` calls it when the launcher started
several ranks and the script did not start a process group itself.

[Note: collective timeout] A rank that dies (SIGKILL, OOM killer) closes its sockets, and gloo
raises on the others at their next collective. A rank that hangs instead (stopped, stuck in
IO, a partitioned network) closes nothing; the others then wait in their collective until the
process group's timeout, and raise. torch's default for gloo is 30 minutes; ours is
DEFAULT_TIMEOUT_S, and OFFLOAD_ENGINE_DIST_TIMEOUT_S sets it (seconds). It bounds the wait of
one collective, so it must exceed the longest time one rank may run ahead of another: a
step's imbalance, or a checkpoint save.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import sys

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500  # torchrun's and deepspeed's default too
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "OFFLOAD_ENGINE_DIST_TIMEOUT_S"

# (rank, size, local rank, local size) variables of each MPI family, most specific first.
_MPI_VARS = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher told it."""

    launcher: str                  # "torchrun" | "deepspeed" | "env" | "mpi:<family>" | "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None   # None: the launcher did not say (ranks per node unknown)
    master_addr: str
    master_port: int


class LaunchError(RuntimeError):
    """The environment names an impossible place in the job; the message names the variable."""


def _int_var(environ, name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def local_rank_arg(argv=None) -> int | None:
    """The value of ``--local_rank=N`` / ``--local_rank N`` (or ``--local-rank``, torch's newer
    spelling) on the command line, as the deepspeed launcher passes it; None when absent."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for i, arg in enumerate(argv):
        for flag in _LOCAL_RANK_FLAGS:
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            elif arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            else:
                continue
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{flag} must be an integer, got {value!r}") from None
    return None


def script_args(argv=None) -> list[str]:
    """The command-line arguments with the launcher's ``--local_rank`` removed, for the script's
    own parser: ``parser.parse_args(script_args())`` works under every launcher."""
    argv = sys.argv[1:] if argv is None else list(argv)
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if any(arg.startswith(flag + "=") for flag in _LOCAL_RANK_FLAGS):
            continue
        if arg in _LOCAL_RANK_FLAGS and i + 1 < len(argv):
            skip = True
            continue
        out.append(arg)
    return out


def _mpi_world() -> tuple[int, int, int, int, str]:
    """(rank, size, local rank, local size, rank 0's host) from mpi4py, for an MPI launch whose
    environment lacks some of these. Importing mpi4py.MPI initializes MPI, so this runs only
    when an MPI launcher is known to have started us."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise LaunchError("started by an MPI launcher that set neither the rank variables read here "
                          "(OMPI_COMM_WORLD_*, PMI_*, MV2_COMM_WORLD_*) nor, for a job over several nodes, "
                          "MASTER_ADDR; install mpi4py (pip install mpi4py) or set RANK, WORLD_SIZE, LOCAL_RANK "
                          "and MASTER_ADDR") from err
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node's memory
    try:
        master = comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
        return comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), master
    finally:
        node.Free()


def detect(environ=None, argv=None) -> LaunchEnv:
    """Reads the launcher's environment (see the module docstring); world size 1 when no
    launcher started us. Never starts a process group."""
    environ = os.environ if environ is None else environ
    flag_rank = local_rank_arg(argv)
    port = _int_var(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else DEFAULT_MASTER_PORT

    if "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in environ else
                    "deepspeed" if "CROSS_RANK" in environ else "env")
        rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
        local = (_int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else
                 flag_rank if flag_rank is not None else None)
        local_world = next((_int_var(environ, k) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in environ), None)
        if local is None:
            if world > 1 and local_world != world:
                raise LaunchError(f"RANK={rank} and WORLD_SIZE={world} are set but not LOCAL_RANK (nor --local_rank); "
                                  "set LOCAL_RANK, the rank's index on its node")
            local = rank
        master = environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR
        if world > 1 and not environ.get("MASTER_ADDR") and local_world != world:
            raise LaunchError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: set it to rank 0's host "
                              f"(127.0.0.1 when every rank runs on this node)")
        return _checked(LaunchEnv(launcher, rank, world, local, local_world, master, port))

    for family, rank_var, size_var, local_var, local_size_var in _MPI_VARS:
        if rank_var not in environ or size_var not in environ:
            continue
        rank, world = _int_var(environ, rank_var), _int_var(environ, size_var)
        local = _int_var(environ, local_var) if local_var in environ else None
        local_world = _int_var(environ, local_size_var) if local_size_var in environ else None
        master = environ.get("MASTER_ADDR")
        one_node = local_world == world
        if world > 1 and (local is None or (not master and not one_node)):
            rank, world, local, local_world, rank0_host = _mpi_world()
            master = master or (DEFAULT_MASTER_ADDR if local_world == world else rank0_host)
        return _checked(LaunchEnv(f"mpi:{family}", rank, world, local if local is not None else 0, local_world,
                                  master or DEFAULT_MASTER_ADDR, port))

    local = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else flag_rank
    return LaunchEnv("none", 0, 1, local or 0, 1, environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR, port)


def _checked(env: LaunchEnv) -> LaunchEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise LaunchError(f"{env.launcher} launch: rank {env.rank} is not in a world of {env.world_size} "
                          "(RANK must be in [0, WORLD_SIZE))")
    if env.local_world_size is not None and not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(f"{env.launcher} launch: local rank {env.local_rank} is not in [0, {env.local_world_size})")
    return env


def apply(env: LaunchEnv, environ=None) -> None:
    """Writes RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (and LOCAL_WORLD_SIZE when
    known) for torch.distributed's env:// rendezvous; variables already set are left as they
    are (detect() read them)."""
    environ = os.environ if environ is None else environ
    values = {"RANK": env.rank, "WORLD_SIZE": env.world_size, "LOCAL_RANK": env.local_rank,
              "MASTER_ADDR": env.master_addr, "MASTER_PORT": env.master_port}
    if env.local_world_size is not None:
        values["LOCAL_WORLD_SIZE"] = env.local_world_size
    for name, value in values.items():
        environ.setdefault(name, str(value))


def timeout() -> datetime.timedelta:
    """The collective timeout ([Note: collective timeout]): OFFLOAD_ENGINE_DIST_TIMEOUT_S
    seconds, default DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LaunchError(f"{TIMEOUT_ENV}={raw!r}: must be a positive number of seconds (default "
                          f"{DEFAULT_TIMEOUT_S:g})")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device=None, backend: str | None = None) -> LaunchEnv:
    """Detects the launcher and, when it started more than one rank and no process group
    exists yet, starts one (env:// rendezvous) with the timeout of [Note: collective timeout].
    backend: default NCCL when `device` is a CUDA device (it is then made the current one),
    gloo otherwise. Returns what was detected. Safe to call more than once."""
    import torch
    import torch.distributed as dist

    env = detect()
    if env.world_size == 1 or dist.is_initialized():
        return env
    apply(env)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds this rank's communicator to the current device
    import torch.distributed.nn.functional  # noqa: F401 - first: [Note: import torch.distributed.nn early]
    dist.init_process_group(backend, init_method="env://", timeout=timeout())
    return env
