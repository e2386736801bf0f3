"""A cluster of S servers on this machine: one network namespace per server, each joined by a
veth pair to a bridge in a further namespace, the links shaped with tbf in both directions.

::

    ns gns<pid>s0  [lo, gsup 198.18.0.1/24] ──veth── s0 ┐
    ns gns<pid>s1  [lo, gsup 198.18.0.2/24] ──veth── s1 ┼─ br0   (ns gns<pid>b)
    ...                                                 ┘

Every server's uplink is called ``gsup`` so ``GLOO_SOCKET_IFNAME=gsup`` is one value; processes
of one server reach each other over their namespace's own addresses. Nothing is created in, or
changed on, the host's own network namespace: every link is created inside the bridge namespace
and moved straight into its server namespace. Addresses come from 198.18.0.0/15 (RFC 2544).

:class:`SimulatedCluster` always removes its namespaces, killing whatever still runs in them;
namespaces left by a launcher that was SIGKILLed are swept on the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from ..errors import GnnscaleError, UsageError

__all__ = ["ClusterPlan", "SimulatedCluster", "parse_rate", "setup_commands",
           "teardown_commands", "check_can_simulate", "UPLINK", "NS_PREFIX", "MAX_SERVERS"]

log = logging.getLogger("gnnscale.launch")

UPLINK = "gsup"
NS_PREFIX = "gns"
MAX_SERVERS = 200
_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)[bs]\d*$")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def parse_rate(rate: str) -> int | None:
    """``1gbit`` -> 10**9 bits/s (tc units; ``none`` or ``0``: unshaped -> None)."""
    s = rate.strip().lower()
    if s in ("none", "0", "off", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise UsageError(f"--link-rate {rate!r}: write a tc rate such as 100mbit, 1gbit, 10gbit "
                         "(or none)")
    bps = int(float(m.group(1)) * _UNITS[m.group(2)])
    if bps < 8000:
        raise UsageError(f"--link-rate {rate!r} is below 8kbit; the job could not start")
    return bps


@dataclass(frozen=True)
class ClusterPlan:
    """Names and addresses of a simulated cluster (a value: builds commands, runs nothing)."""

    servers: int
    rate_bps: int | None = 10**9
    tag: str = ""

    @property
    def bridge_ns(self) -> str:
        return f"{NS_PREFIX}{self.tag}b"

    def ns(self, i: int) -> str:
        return f"{NS_PREFIX}{self.tag}s{i}"

    def addr(self, i: int) -> str:
        return f"198.18.{(i + 1) // 256}.{(i + 1) % 256}"

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *(self.ns(i) for i in range(self.servers))]


def _tbf(ns: str, dev: str, bps: int) -> list[str]:
    # 1 ms at full rate, at least 32 KiB: a wire has no burst, and with 10 ms an exchange of
    # ~1 MB per server passed at the speed of the veth underneath (1.25 MB at 1 Gbit/s).
    burst = max(32 * 1024, bps // 8 // 1000)
    return ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{bps}bit",
            "burst", str(burst), "latency", "100ms"]


def setup_commands(plan: ClusterPlan) -> list[list[str]]:
    """The ip/tc commands that build the cluster, in order."""
    br = plan.bridge_ns
    cmds = [["ip", "netns", "add", br],
            ["ip", "-n", br, "link", "set", "lo", "up"],
            ["ip", "-n", br, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", br, "link", "set", "br0", "up"]]
    for i in range(plan.servers):
        ns, peer = plan.ns(i), f"s{i}"
        cmds += [["ip", "netns", "add", ns],
                 ["ip", "-n", ns, "link", "set", "lo", "up"],
                 ["ip", "-n", br, "link", "add", peer, "type", "veth", "peer", "name", UPLINK,
                  "netns", ns],
                 ["ip", "-n", br, "link", "set", peer, "master", "br0"],
                 ["ip", "-n", br, "link", "set", peer, "up"],
                 ["ip", "-n", ns, "addr", "add", f"{plan.addr(i)}/16", "dev", UPLINK],
                 ["ip", "-n", ns, "link", "set", UPLINK, "up"]]
        if plan.rate_bps is not None:
            cmds += [_tbf(ns, UPLINK, plan.rate_bps), _tbf(br, peer, plan.rate_bps)]
    return cmds


def teardown_commands(plan: ClusterPlan) -> list[list[str]]:
    """Deleting the namespaces removes their links (and qdiscs) with them."""
    return [["ip", "netns", "delete", ns] for ns in reversed(plan.namespaces)]


def check_can_simulate(rate_bps: int | None) -> None:
    """Refuse clearly without root or iproute2."""
    if os.geteuid() != 0:
        raise UsageError("--simulate-servers needs root (it creates network namespaces); run it "
                         "as root, or launch on real hosts with --hosts")
    missing = [t for t in ("ip",) + (("tc",) if rate_bps is not None else ())
               if shutil.which(t) is None]
    if missing:
        raise UsageError(f"--simulate-servers needs iproute2 ({' and '.join(missing)} not found); "
                         "install it with `apt-get install iproute2`")


def _list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _kill_in(ns: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete(namespaces: Sequence[str]) -> list[str]:
    failed = []
    for ns in namespaces:
        _kill_in(ns)
        r = subprocess.run(["ip", "netns", "delete", ns], capture_output=True, text=True,
                           timeout=30)
        if r.returncode and ns in _list_netns():
            failed.append(f"{ns}: {r.stderr.strip()}")
    return failed


def sweep_stale() -> list[str]:
    """Remove namespaces of earlier launchers that are no longer alive."""
    stale = []
    for ns in _list_netns():
        m = _NS_RE.match(ns)
        if m and not os.path.exists(f"/proc/{int(m.group(1))}"):
            stale.append(ns)
    if stale:
        log.info("removing %d namespace(s) left by a launcher that died: %s", len(stale),
                 " ".join(stale))
        _delete(stale)
    return stale


class SimulatedCluster:
    """Context manager: builds the namespaces on entry and always removes them on exit."""

    def __init__(self, plan: ClusterPlan) -> None:
        self.plan = plan

    def __enter__(self) -> SimulatedCluster:
        check_can_simulate(self.plan.rate_bps)
        sweep_stale()
        try:
            for cmd in setup_commands(self.plan):
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                if r.returncode:
                    raise GnnscaleError(f"could not build the simulated cluster: `{' '.join(cmd)}`"
                                        f" failed: {r.stderr.strip()}")
        except BaseException:
            self.remove()
            raise
        return self

    def kill_processes(self) -> None:
        for ns in self.plan.namespaces:
            if ns in _list_netns():
                _kill_in(ns)

    def remove(self) -> None:
        present = set(_list_netns())
        failed = _delete([ns for ns in reversed(self.plan.namespaces) if ns in present])
        if failed:
            raise GnnscaleError("could not remove network namespace(s) " + "; ".join(failed))

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
