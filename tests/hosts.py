"""Two "hosts" on this machine for multi-host tests: each a network namespace of its own (joined to
the other by a veth pair, one address each), with its own UTS host name and its own /dev/shm (a
private tmpfs), made and torn down by the test. A process runs "on" a host by entering the
namespaces of that host's holder process (nsenter), so every process on one host shares its
/dev/shm and name, as ranks on one machine do, and reaches the other host only over the veth
link. Needs root and iproute2; `TwoHosts.unavailable()` says why not where it cannot run.

[Note: host holder] A mount namespace lives as long as a process in it: each host's is made by
`unshare --uts --mount` inside `ip netns exec`, which sets the host name, mounts the tmpfs on
/dev/shm and then sleeps; later processes join its net, UTS and mount namespaces by its pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

SUBNET = "10.231.{}.{}"
IFNAME = "oelink0"  # each host's end of the veth link, inside its namespace


class Host:
    def __init__(self, name: str, netns: str, ifname: str, address: str, holder: subprocess.Popen):
        self.name, self.netns, self.ifname, self.address, self.holder = name, netns, ifname, address, holder

    def command(self, argv) -> list[str]:
        """`argv` run inside this host's namespaces."""
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-u", "-m", "--", *map(str, argv)]

    def popen(self, argv, env=None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), env=env, **kw)

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=60, **kw)


class TwoHosts:
    """`with TwoHosts() as (a, b):` two hosts on one veth link ([Note: host holder])."""

    def __init__(self, tag: str | None = None):
        tag = tag or f"{os.getpid() % 10000}"
        self.names = [f"oe{tag}a", f"oe{tag}b"]
        self.subnet = int(tag) % 250 + 1
        self.hosts: list[Host] = []

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "nsenter", "unshare"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (iproute2 / util-linux)"
        probe = f"oeprobe{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def _ip(self, *args, netns: str | None = None) -> None:
        cmd = ["ip", *(["-n", netns] if netns else []), *args]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")

    def __enter__(self) -> list[Host]:
        try:
            veth = [f"{n}0" for n in self.names]
            for ns in self.names:
                self._ip("netns", "add", ns)
            self._ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
            for i, ns in enumerate(self.names):
                address = SUBNET.format(self.subnet, i + 1)
                self._ip("link", "set", veth[i], "netns", ns)
                # One interface name on every host, as on a cluster's nodes: one GLOO_SOCKET_IFNAME
                # serves a launcher that starts ranks on both (mpiexec -genv).
                self._ip("link", "set", veth[i], "name", IFNAME, netns=ns)
                self._ip("addr", "add", f"{address}/24", "dev", IFNAME, netns=ns)
                self._ip("link", "set", IFNAME, "up", netns=ns)
                self._ip("link", "set", "lo", "up", netns=ns)
                host_name = f"host{'ab'[i]}-{self.names[i]}"
                script = (f"hostname {host_name} && mount -t tmpfs -o size=1g oe-shm /dev/shm && echo ready && "
                          "exec sleep infinity")
                holder = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount",
                                           "--propagation", "private", "sh", "-c", script],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                line = holder.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"host {host_name} did not start: {holder.stderr.read().strip()}")
                self.hosts.append(Host(host_name, ns, IFNAME, address, holder))
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def link(self, up: bool) -> None:
        """Sets the veth link up or down (a network cut)."""
        for h in self.hosts:
            self._ip("link", "set", h.ifname, "up" if up else "down", netns=h.netns)

    def __exit__(self, *exc) -> None:
        for h in self.hosts:
            if h.holder.poll() is None:
                h.holder.send_signal(signal.SIGKILL)
                h.holder.wait(timeout=10)  # the last process in the mount namespace: the tmpfs goes with it
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its end of the veth pair
        self.hosts = []
