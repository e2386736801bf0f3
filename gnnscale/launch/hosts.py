"""Host lists: ``--hosts h1,h2`` or ``--hostfile FILE`` (one host per line, ``#`` comments;
``user@host`` is passed to ssh as is), and the addresses the hosts are reached at.

A host may be an ssh-config alias that only the launcher's ssh knows. ssh itself resolves it
(``ssh -G``), but torchrun on the other hosts would not: the launcher resolves every host once,
alias -> ssh's ``hostname`` -> an address, and hands the address to the agents (rendezvous
endpoint, each agent's advertised address)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence

from ..errors import UsageError

__all__ = ["parse_hosts", "resolve_hosts", "ssh_target_host", "ssh_hostname"]


def parse_hosts(hosts: str | None, hostfile: str | None) -> list[str]:
    """The host list from ``--hosts`` or ``--hostfile`` (empty: this machine only)."""
    if hosts and hostfile:
        raise UsageError("give either --hosts or --hostfile, not both")
    names: list[str] = []
    if hostfile:
        if not os.path.isfile(hostfile):
            raise UsageError(f"--hostfile {hostfile}: no such file")
        with open(hostfile) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    names.append(line.split()[0])
        if not names:
            raise UsageError(f"--hostfile {hostfile} lists no hosts")
    elif hosts is not None:
        names = [h.strip() for h in hosts.split(",") if h.strip()]
        if not names:
            raise UsageError("--hosts is empty; write --hosts host1,host2")
    dup = sorted({h for h in names if names.count(h) > 1})
    if dup:
        raise UsageError(f"host {dup[0]} is listed twice; one agent per host runs "
                         "--nproc-per-node processes")
    return names


def ssh_target_host(target: str) -> str:
    """The host name of an ssh target ``[user@]host``."""
    return target.rsplit("@", 1)[-1]


def ssh_hostname(target: str, ssh_options: Sequence[str] = (), ssh_config: str | None = None
                 ) -> str:
    """The host name ssh will connect to for ``target`` (``ssh -G`` applies the ssh config's
    aliases locally, without connecting; ``ssh_config`` is ``ssh -F``'s file)."""
    host = ssh_target_host(target)
    if shutil.which("ssh") is None:
        return host
    config = ["-F", ssh_config] if ssh_config else []
    argv = ["ssh", "-G", *config, *(a for o in ssh_options for a in ("-o", o)), target]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return host
    for line in r.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname" and value:
            return value.strip()
    return host


def _resolve(host: str, timeout: float) -> tuple[str | None, str]:
    """(an address of ``host``, "") or (None, why not); IPv4 first. A resolver that hangs
    counts as failing."""
    result: list[tuple[str | None, str]] = []

    def work() -> None:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            infos.sort(key=lambda i: i[0] != socket.AF_INET)
            result.append((str(infos[0][4][0]), ""))
        except (OSError, UnicodeError, IndexError) as e:
            result.append((None, getattr(e, "strerror", None) or str(e) or "no address"))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else (None, f"no answer from the resolver within {timeout:g} s")


def resolve_hosts(hosts: Sequence[str], ssh_options: Sequence[str] = (),
                  ssh_config: str | None = None, timeout: float = 10.0) -> dict[str, str]:
    """The address of every host (``[user@]host`` or an ssh-config alias): ssh's host name for
    it, resolved here.

    Raises:
        UsageError: naming the first host whose name does not resolve.
    """
    out = {}
    for target in hosts:
        name = ssh_hostname(target, ssh_options, ssh_config)
        addr, why = _resolve(name, timeout)
        if addr is None:
            shown = ssh_target_host(target)
            alias = f" (ssh: {name})" if name != shown else ""
            raise UsageError(f"unknown host {shown!r}{alias}: {why}; check --hosts/--hostfile")
        out[target] = addr
    return out
