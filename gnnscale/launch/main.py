"""``gnnscale launch``: turn the command line into one agent command per host and run them."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType

import psutil

from ..errors import UsageError
from .cluster import (
    MAX_SERVERS,
    UPLINK,
    ClusterPlan,
    SimulatedCluster,
    parse_rate,
    setup_commands,
    teardown_commands,
)
from .commands import AgentSpec, forwarded_env, host_chain
from .hosts import parse_hosts, resolve_hosts, ssh_target_host
from .runner import HostRun, run_hosts

__all__ = ["launch", "plan_hosts", "max_processes", "DEFAULT_PORT", "add_arguments"]

DEFAULT_PORT = 29400
MIB_PER_PROCESS = 256  # resident memory a torch + DGL worker needs at the very least
PROCS_PER_CORE = 16


def max_processes() -> tuple[int, str]:
    """How many worker processes this machine can hold, and why."""
    cpus = os.cpu_count() or 1
    mem = psutil.virtual_memory().available // (MIB_PER_PROCESS * 2**20)
    by_cpu = PROCS_PER_CORE * cpus
    if mem < by_cpu:
        return int(mem), f"{mem} by available memory at {MIB_PER_PROCESS} MiB each"
    return by_cpu, f"{by_cpu}: {cpus} cores x {PROCS_PER_CORE}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _validate(args: argparse.Namespace, cmd: Sequence[str]) -> None:
    if not cmd:
        raise UsageError("missing command: write `gnnscale launch [options] -- CMD ...`, e.g. "
                         "`gnnscale launch --nproc-per-node 2 -- examples/train_dist.py --parts P`")
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node {args.nproc_per_node}: need at least 1 process per host")
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts {args.max_restarts}: need 0 or more")
    if args.ssh_config is not None and not os.path.isfile(args.ssh_config):
        raise UsageError(f"--ssh-config {args.ssh_config}: no such file")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: need a TCP port between 1 and 65535")
    if args.simulate_servers is not None:
        if args.hosts or args.hostfile:
            raise UsageError("--simulate-servers builds its own hosts; drop --hosts/--hostfile")
        s = args.simulate_servers
        if s < 1:
            raise UsageError(f"--simulate-servers {s}: need at least 1 server")
        if s > MAX_SERVERS:
            raise UsageError(f"--simulate-servers {s}: at most {MAX_SERVERS} servers can be "
                             "simulated on one machine")
    if not (args.hosts or args.hostfile):  # everything runs on this machine
        total = args.nproc_per_node * (args.simulate_servers or 1)
        limit, why = max_processes()
        if total > limit:
            what = (f"{args.simulate_servers} servers x {args.nproc_per_node} processes"
                    if args.simulate_servers else f"{args.nproc_per_node} processes")
            raise UsageError(f"{what} = {total} workers is more than this machine can hold "
                             f"(at most {why}); use fewer or launch on --hosts")


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def plan_hosts(args: argparse.Namespace, cmd: Sequence[str], *, tag: str | None = None,
               environ: dict[str, str] | None = None, addresses: Mapping[str, str] | None = None
               ) -> tuple[list[HostRun], ClusterPlan | None]:
    """One :class:`HostRun` per host (and the cluster plan with ``--simulate-servers``).

    Pure apart from reading ``environ``; ``tag`` names this run's namespaces (default: pid);
    ``addresses`` maps each ssh host to the address its peers reach it at (from
    :func:`~gnnscale.launch.hosts.resolve_hosts`; a host missing there is used by name).
    """
    environ = dict(os.environ if environ is None else environ)
    python = args.python or sys.executable
    rdzv_id = args.rdzv_id or f"gnnscale-{os.getpid()}-{int(time.time())}"
    cwd = args.chdir or os.getcwd()
    extra = forwarded_env({}, args.env or [])
    common = dict(nproc_per_node=args.nproc_per_node, rdzv_id=rdzv_id, cmd=tuple(cmd),
                  python=python, max_restarts=args.max_restarts, cwd=cwd)
    hosts = parse_hosts(args.hosts, args.hostfile)
    if args.simulate_servers is not None:
        plan = ClusterPlan(args.simulate_servers, parse_rate(args.link_rate),
                           str(os.getpid()) if tag is None else tag)
        port = args.port or DEFAULT_PORT
        runs = []
        for i in range(plan.servers):
            spec = AgentSpec(label=f"server{i}", nnodes=plan.servers,
                             rdzv_endpoint=f"{plan.addr(0)}:{port}", is_host=i == 0,
                             local_addr=plan.addr(i),
                             env={"GLOO_SOCKET_IFNAME": UPLINK, **extra}, **common)
            runs.append(HostRun(spec.label, host_chain(spec, "netns", ns=plan.ns(i)), "netns"))
        return runs, plan
    if not hosts:
        port = args.port or _free_port()
        spec = AgentSpec(label=args.label or socket.gethostname().split(".")[0], nnodes=1,
                         rdzv_endpoint=f"127.0.0.1:{port}", is_host=True, env=extra,
                         **common)
        return [HostRun(spec.label, host_chain(spec, "local"), "local")], None
    port = args.port or DEFAULT_PORT
    env = forwarded_env(environ, args.env or [])
    def addr(target: str) -> str:
        return (addresses or {}).get(target, ssh_target_host(target))

    runs = []
    for i, target in enumerate(hosts):
        # Peers reach a host at its address (rendezvous store, MASTER_ADDR): the launcher's
        # ssh may know it by an alias that no other host can resolve.
        spec = AgentSpec(label=ssh_target_host(target), nnodes=len(hosts),
                         rdzv_endpoint=_endpoint(addr(hosts[0]), port), is_host=i == 0, env=env,
                         local_addr=addr(target), **common)
        argv = host_chain(spec, "ssh", ssh_host=target, ssh_port=args.ssh_port,
                          ssh_identity=args.ssh_identity, ssh_options=args.ssh_option or (),
                          check_port=port if i == 0 else None, ssh_config=args.ssh_config)
        runs.append(HostRun(spec.label, argv, "ssh"))
    return runs, None


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the job like Ctrl-C does."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Teardown must finish: ignore Ctrl-C/SIGTERM while namespaces are removed."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def launch(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    _validate(args, cmd)
    hosts = parse_hosts(args.hosts, args.hostfile)
    # Resolved once, also for --dry-run: the commands printed are the ones that would run.
    addresses = resolve_hosts(hosts, args.ssh_option or (), args.ssh_config) if hosts else None
    runs, plan = plan_hosts(args, cmd, addresses=addresses)
    if args.dry_run:
        if plan is not None:
            print("# build the simulated cluster")
            for c in setup_commands(plan):
                print(shlex.join(c))
            print("# one agent per server")
        for r in runs:
            print(shlex.join(r.argv))
        if plan is not None:
            print("# remove the simulated cluster (always, also after a failure)")
            for c in teardown_commands(plan):
                print(shlex.join(c))
        return 0
    if runs[0].transport == "local" and args.port is not None and _port_in_use(args.port):
        raise UsageError(f"--port {args.port} is in use on this machine; pick another port "
                         "or leave --port out to take a free one")
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    with _signals_as_interrupt():
        if plan is None:
            return run_hosts(runs, timeout=timeout, status=not args.quiet)
        cluster = SimulatedCluster(plan)
        try:
            cluster.__enter__()
        except KeyboardInterrupt:
            return 130
        try:
            return run_hosts(runs, timeout=timeout, status=not args.quiet)
        finally:
            with _no_interrupts():
                cluster.kill_processes()
                cluster.remove()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``gnnscale launch`` (registered by :mod:`gnnscale.cli`)."""
    where = p.add_argument_group("where to run (default: this machine, one agent)")
    where.add_argument("--hosts", metavar="H1,H2,...",
                       help="run one agent per host over ssh; the first host serves the "
                            "rendezvous")
    where.add_argument("--hostfile", metavar="FILE",
                       help="hosts one per line (# comments; user@host allowed)")
    where.add_argument("--simulate-servers", type=int, metavar="S",
                       help="build S network namespaces on this machine joined by shaped "
                            "links, one agent in each (needs root and iproute2); they are always "
                            "removed")
    where.add_argument("--link-rate", default="1gbit", metavar="RATE",
                       help="tbf rate of every simulated uplink, both directions (tc units: "
                            "100mbit, 1gbit, 10gbit; none = unshaped; default 1gbit)")
    job = p.add_argument_group("the job")
    job.add_argument("--nproc-per-node", "-G", type=int, required=True, metavar="G",
                     help="worker processes per host (G >= 1)")
    job.add_argument("--max-restarts", type=int, default=0, metavar="R",
                     help="restart the workers up to R times after a failure (the script "
                          "resumes from its checkpoint; default 0)")
    job.add_argument("--port", type=int, metavar="PORT",
                     help=f"rendezvous port on the first host (default {DEFAULT_PORT}; "
                          "a free port when running on this machine)")
    job.add_argument("--rdzv-id", help="rendezvous job id (default: unique per launch)")
    job.add_argument("--env", action="append", metavar="NAME=VALUE",
                     help="set a variable for every worker (repeatable); PATH, PYTHONPATH, "
                          "VIRTUAL_ENV, OMP_*, GLOO_*, NCCL_*, TORCH_*, GNNSCALE_* are forwarded "
                          "to ssh hosts")
    job.add_argument("--python", help="interpreter on the hosts (default: this one)")
    job.add_argument("--chdir", metavar="DIR",
                     help="working directory on the hosts (default: the current one)")
    job.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="stop the whole job after this long and fail")
    ssh = p.add_argument_group("ssh (with --hosts/--hostfile)")
    ssh.add_argument("--ssh-port", type=int, help="sshd port on the hosts")
    ssh.add_argument("--ssh-identity", metavar="KEY", help="private key file (ssh -i)")
    ssh.add_argument("--ssh-option", action="append", metavar="OPT",
                     help="extra ssh -o option, e.g. StrictHostKeyChecking=no (repeatable)")
    ssh.add_argument("--ssh-config", metavar="FILE",
                     help="ssh config file (ssh -F) instead of ~/.ssh/config; hosts may be its "
                          "aliases, resolved here to the addresses the agents are given")
    out = p.add_argument_group("output")
    out.add_argument("--dry-run", action="store_true",
                     help="print the exact commands (one per line) and run nothing")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="no per-host state lines, only the job's own output")
    out.add_argument("--label", help="host name in output prefixes when running on this machine")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                   help="the command every rank runs; a leading *.py script runs under python")
