#!/usr/bin/env python3
"""A stand-in for ssh for launchers that start ranks on other hosts (MPICH's hydra:
`mpiexec -launcher ssh -launcher-exec tests/ns_ssh.py`): `ns_ssh.py [ssh options] HOST COMMAND...`
runs COMMAND through a shell on the two-host harness's HOST (tests/hosts.py), entering that
host's namespaces. The hosts are named in NS_SSH_HOSTS ("name=holder_pid,..."); any other host
is refused, so nothing is started outside the namespaces a test made."""
import os
import sys

# ssh options that take a value; the others (-x, -q, ...) stand alone.
WITH_VALUE = set("bcDEeFIiJLlmOoPpQRSWw")


def main(argv: list[str]) -> int:
    hosts = dict(item.split("=", 1) for item in os.environ.get("NS_SSH_HOSTS", "").split(",") if item)
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i][-1] in WITH_VALUE and len(argv[i]) == 2 else 1
    if i >= len(argv):
        sys.stderr.write("ns_ssh: no host given\n")
        return 255
    host, command = argv[i], " ".join(argv[i + 1:])
    if host not in hosts:
        sys.stderr.write(f"ns_ssh: {host!r} is not one of the test's hosts ({', '.join(hosts) or 'none'})\n")
        return 255
    os.execvp("nsenter", ["nsenter", "-t", hosts[host], "-n", "-u", "-m", "--", "/bin/sh", "-c", command])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
