"""Host lists: ``--hosts h1,h2`` or ``--hostfile FILE`` (one host per line, ``#`` comments;
``user@host`` is passed to ssh as is)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from ..errors import UsageError

__all__ = ["parse_hosts", "check_resolvable", "ssh_target_host"]


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


def check_resolvable(hosts: Sequence[str]) -> None:
    """Raise a :class:`UsageError` naming the first host whose name does not resolve."""
    for target in hosts:
        host = ssh_target_host(target)
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError) as e:
            raise UsageError(f"unknown host {host!r} ({e.strerror if hasattr(e, 'strerror') else e}); "
                             "check --hosts/--hostfile") from None
