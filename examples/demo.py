"""`make demo`: partition the embedded default graph, train it on 2 servers x 2 processes on this
machine (`gnnscale launch --simulate-servers`: network namespaces joined by 1 Gbit/s links, when
run as root; otherwise two torchrun agents on loopback), and compare with the same training in
one process.

    python examples/demo.py [--model sage] [--epochs 30] [--servers 2] [--nproc-per-server 2]

Dropout is off, so the distributed losses match the single-process ones to float precision.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_single(args: argparse.Namespace) -> str:
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--graph", args.graph, "--model",
           args.model, "--epochs", str(args.epochs), "--dropout", "0", "--log-every",
           str(args.log_every)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        sys.exit(f"demo: single-process run failed:\n{out.stderr[-3000:]}")
    return out.stdout


def train_command(args: argparse.Namespace, parts: str) -> list[str]:
    return [os.path.join(HERE, "train_dist.py"), "--parts", parts, "--model", args.model,
            "--epochs", str(args.epochs), "--dropout", "0", "--log-every", str(args.log_every)]


def can_simulate() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def run_distributed(args: argparse.Namespace, parts: str) -> int:
    """`gnnscale launch --simulate-servers`: one network namespace per server, 1 Gbit/s links
    (needs root and iproute2); otherwise torchrun agents on this machine's loopback."""
    if not can_simulate():
        return run_local_agents(args, parts)
    cmd = [sys.executable, "-m", "gnnscale", "launch", "--simulate-servers", str(args.servers),
           "--nproc-per-node", str(args.nproc_per_server), "--link-rate", "1gbit",
           "--timeout", str(args.timeout), "--", *train_command(args, parts)]
    launcher = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        return launcher.wait()
    except KeyboardInterrupt:  # the launcher got the same Ctrl-C and stops every agent
        return launcher.wait()


def run_local_agents(args: argparse.Namespace, parts: str) -> int:
    """One torchrun agent per simulated server; all stopped if one fails or time runs out."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agents = []
    for node in range(args.servers):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.servers),
               "--node-rank", str(node), "--nproc-per-node", str(args.nproc_per_server),
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               *train_command(args, parts)]
        agents.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            codes = [a.poll() for a in agents]
            if any(c not in (None, 0) for c in codes):
                print(f"demo: an agent failed (exit codes {codes}); stopping the others",
                      file=sys.stderr)
                return 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
        print(f"demo: timed out after {args.timeout} s", file=sys.stderr)
        return 1
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGTERM)
        for a in agents:
            try:
                a.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(a.pid, signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--graph", default="synthetic:demo")
    p.add_argument("--parts-dir", default="demo-parts")
    p.add_argument("--model", default="sage", choices=["gcn", "sage", "gat"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--nproc-per-server", type=int, default=2)
    p.add_argument("--timeout", type=int, default=600)
    args = p.parse_args()
    k = args.servers * args.nproc_per_server

    print(f"== 1. partition {args.graph} into {k} parts", flush=True)
    subprocess.run([sys.executable, "-m", "gnnscale", "partition", args.graph, "--parts", str(k),
                    "--out", args.parts_dir, "--force", "--add-self-loops"], check=True)

    print(f"\n== 2. train {args.model} on one process (reference)", flush=True)
    single = run_single(args)
    print(single, end="")

    how = "gnnscale launch --simulate-servers" if can_simulate() else "torchrun on loopback"
    print(f"\n== 3. train {args.model} on {args.servers} servers x {args.nproc_per_server} "
          f"processes ({how})", flush=True)
    if run_distributed(args, args.parts_dir):
        sys.exit(1)
    acc = re.findall(r"test accuracy ([0-9.]+)", single)
    print(f"\nsingle-process test accuracy {acc[-1] if acc else '?'}; the distributed run above "
          "should print the same losses and accuracies (float32: an accuracy may differ in the "
          "last digit where a node's two best classes lie within rounding of each other, as the "
          "sums are added in another order).")


if __name__ == "__main__":
    main()
