"""Start a job: one torchrun agent per host (ssh, simulated servers or this machine), output
prefixed with host and rank, and every agent stopped when one fails. See ``gnnscale launch
--help`` and :mod:`gnnscale.launch.commands` for the exact command chain."""

from __future__ import annotations

from .cluster import ClusterPlan, SimulatedCluster, parse_rate, setup_commands, teardown_commands
from .commands import AgentSpec, agent_argv, forwarded_env, host_chain, ssh_argv, torchrun_argv
from .hosts import parse_hosts
from .main import add_arguments, launch, plan_hosts
from .runner import HostRun, run_hosts

__all__ = ["AgentSpec", "ClusterPlan", "HostRun", "SimulatedCluster", "add_arguments",
           "agent_argv", "forwarded_env", "host_chain", "launch", "parse_hosts", "parse_rate",
           "plan_hosts", "run_hosts", "setup_commands", "ssh_argv", "teardown_commands",
           "torchrun_argv"]
