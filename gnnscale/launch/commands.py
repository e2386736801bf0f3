"""Pure builders of every command the launcher runs: torchrun, the per-host agent supervisor,
ssh, ``ip netns exec``. They return argument lists and touch nothing, so they are unit-tested
without ssh, namespaces or processes.

The chain for one host is::

    [ssh HOST -- | ip netns exec NS] env K=V ... PYTHON .../gnnscale/launch/agent.py --label HOST
        ... -- PYTHON -m torch.distributed.run --rdzv-backend c10d ... --no-python CMD...

ssh hands its remote command to a shell, so the remote part is an argument list quoted with
:func:`shlex.join` (each argument quoted on its own, never spliced).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["AGENT_SCRIPT", "AgentSpec", "FORWARD_PREFIXES", "FORWARD_NAMES", "PREFIX_TEMPLATE_VAR",
           "forwarded_env", "worker_command", "torchrun_argv", "agent_argv", "env_argv",
           "ssh_argv", "netns_exec_argv", "host_chain"]

#: Environment variables a job needs on every host (names, then name prefixes).
FORWARD_NAMES = ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
                 "LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "LOGLEVEL")
# MALLOC_*: glibc's allocator thresholds (or LD_PRELOAD's jemalloc/tcmalloc) are worth ~20 % of
# a rank's step here (benchmarks/README.md), so every host's ranks get the launcher's choice.
FORWARD_PREFIXES = ("GNNSCALE_", "OMP_", "MKL_", "GLOO_", "NCCL_", "TORCH_", "DGL", "MALLOC_")
#: the per-host supervisor, run by path (hosts are assumed to share the install layout)
AGENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py")
#: torchrun reads the per-rank output prefix from this variable.
PREFIX_TEMPLATE_VAR = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"


@dataclass(frozen=True)
class AgentSpec:
    """What one torchrun agent needs: the job (same on every host) and this host's part.

    Args:
        label: host name shown in output prefixes.
        nnodes: number of agents (hosts) in the job.
        nproc_per_node: worker processes per agent (G).
        rdzv_endpoint: ``address:port`` of the c10d rendezvous store (an address every host
            can reach, not a name only the launcher resolves).
        rdzv_id: job id shared by all agents.
        is_host: whether this agent serves the rendezvous store (the first host).
        cmd: the worker command; a leading ``*.py`` runs under ``python``.
        python: interpreter on the host (default: this one).
        max_restarts: worker-group restarts torchrun may do after a failure.
        local_addr: address other hosts reach this one at (becomes MASTER_ADDR on rank 0).
        cwd: working directory on the host.
        env: variables set on the host before the agent starts.
        agent: path of ``gnnscale/launch/agent.py`` on the host (default: this install's).
    """

    label: str
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    rdzv_id: str
    is_host: bool
    cmd: tuple[str, ...]
    python: str = "python3"
    max_restarts: int = 0
    local_addr: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    agent: str | None = None


def forwarded_env(environ: Mapping[str, str], extra: Sequence[str] = ()) -> dict[str, str]:
    """The subset of ``environ`` a job needs on other hosts, plus ``extra`` ``NAME=VALUE``s."""
    out = {k: v for k, v in environ.items()
           if k in FORWARD_NAMES or k.startswith(FORWARD_PREFIXES)}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep or not name:
            from ..errors import UsageError

            raise UsageError(f"--env {item!r}: write NAME=VALUE")
        out[name] = value
    return dict(sorted(out.items()))


def worker_command(cmd: Sequence[str], python: str) -> list[str]:
    """The command each rank runs: a leading ``*.py`` script runs under ``python``."""
    return [python, *cmd] if cmd and cmd[0].endswith(".py") else list(cmd)


def torchrun_argv(spec: AgentSpec, log_dir: str | None = None) -> list[str]:
    """torchrun for one agent: c10d rendezvous, fixed node count, quick failure detection."""
    argv = [spec.python, "-m", "torch.distributed.run",
            "--nnodes", str(spec.nnodes), "--nproc-per-node", str(spec.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint,
            "--rdzv-id", spec.rdzv_id, "--rdzv-conf", f"is_host={int(spec.is_host)}",
            "--max-restarts", str(spec.max_restarts), "--monitor-interval", "1",
            "--tee", "3"]
    if spec.local_addr:
        argv += ["--local-addr", spec.local_addr]
    if log_dir:
        argv += ["--log-dir", log_dir]
    return argv + ["--no-python", *worker_command(spec.cmd, spec.python)]


def env_argv(env: Mapping[str, str], argv: Sequence[str]) -> list[str]:
    """``env K=V ... argv`` (sets variables on a remote host without a shell)."""
    return ["env", *(f"{k}={v}" for k, v in env.items()), *argv] if env else list(argv)


def agent_argv(spec: AgentSpec, check_port: int | None = None) -> list[str]:
    """The supervisor that runs torchrun on one host (see :mod:`gnnscale.launch.agent`)."""
    env = {**spec.env, PREFIX_TEMPLATE_VAR: f"[{spec.label} rank ${{rank}}] ",
           "PYTHONUNBUFFERED": "1"}
    argv = [spec.python, spec.agent or AGENT_SCRIPT, "--label", spec.label]
    if spec.cwd:
        argv += ["--chdir", spec.cwd]
    if check_port is not None:
        argv += ["--check-port", str(check_port)]
    return env_argv(env, [*argv, "--", *torchrun_argv(spec)])


def ssh_argv(host: str, remote: Sequence[str], port: int | None = None,
             identity: str | None = None, options: Sequence[str] = (),
             connect_timeout: int = 10, config: str | None = None) -> list[str]:
    """ssh running ``remote`` on ``host``; the remote shell receives each argument quoted
    (``config``: an ssh config file, ``ssh -F``)."""
    argv = ["ssh", "-T"]
    if config:
        argv += ["-F", config]
    argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}",
             "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    for opt in options:
        argv += ["-o", opt]
    if port is not None:
        argv += ["-p", str(port)]
    if identity:
        argv += ["-i", identity]
    return [*argv, host, "--", shlex.join(remote)]


def netns_exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` inside network namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def host_chain(spec: AgentSpec, transport: str, *, ns: str | None = None,
               ssh_port: int | None = None, ssh_identity: str | None = None,
               ssh_options: Sequence[str] = (), check_port: int | None = None,
               ssh_host: str | None = None, ssh_config: str | None = None) -> list[str]:
    """The full local command for one host: ``transport`` is local, netns or ssh."""
    inner = agent_argv(spec, check_port)
    if transport == "local":
        return inner
    if transport == "netns":
        assert ns is not None
        return netns_exec_argv(ns, inner)
    if transport == "ssh":
        return ssh_argv(ssh_host or spec.label, inner, ssh_port, ssh_identity, ssh_options,
                        config=ssh_config)
    raise ValueError(f"unknown transport {transport!r}")
