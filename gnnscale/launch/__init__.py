"""Start a job: one torchrun agent per host, output prefixed with host and rank, and every agent
on every host stopped as soon as one process fails (or on Ctrl-C).

    gnnscale partition synthetic:demo --parts 4 --out parts --add-self-loops
    gnnscale launch -G 4 -- examples/train_dist.py --parts parts                # this machine
    gnnscale launch --simulate-servers 2 -G 2 --link-rate 1gbit -- \\
        examples/train_dist.py --parts parts --dropout 0                       # 2 netns servers
    gnnscale launch --hosts node1,node2 -G 2 -- examples/train_dist.py --parts parts   # ssh
    gnnscale launch --hosts node1,node2 -G 2 --dry-run -- ...                  # print commands

Modules: :mod:`.commands` (pure builders of every command), :mod:`.agent` (the per-host
supervisor of torchrun), :mod:`.runner` (runs the hosts, merges output, propagates failures),
:mod:`.cluster` (the simulated servers), :mod:`.hosts` (host lists), :mod:`.main` (the CLI).
"""

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
