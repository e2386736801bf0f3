"""Unit tests of `gnnscale launch`: the pure command builders (no ssh, no namespaces), the
supervisor's failure parsing and process cleanup, the runner's failure propagation with stand-in
agents, and bad input. Nothing here starts torch workers; see test_launch_e2e.py for that."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from gnnscale.cli import main
from gnnscale.errors import UsageError
from gnnscale.launch import cluster as cluster_mod
from gnnscale.launch import main as launch_main
from gnnscale.launch.agent import FailureParser
from gnnscale.launch.cluster import UPLINK, ClusterPlan, parse_rate, setup_commands, teardown_commands
from gnnscale.launch.commands import (
    AGENT_SCRIPT,
    AgentSpec,
    agent_argv,
    env_argv,
    forwarded_env,
    ssh_argv,
    torchrun_argv,
    worker_command,
)
from gnnscale.launch.events import format_event, parse_event
from gnnscale.launch.hosts import parse_hosts, resolve_hosts, ssh_hostname
from gnnscale.launch.runner import HostRun, describe_exit, run_hosts


def _spec(**kw: object) -> AgentSpec:
    base: dict[str, object] = dict(label="n1", nnodes=2, nproc_per_node=4,
                                   rdzv_endpoint="n0:29400", rdzv_id="job", is_host=False,
                                   cmd=("train.py", "--parts", "p p"), python="/py")
    base.update(kw)
    return AgentSpec(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- command builders -------------------------------------------------------------------------

def test_torchrun_argv_uses_c10d_and_fixed_node_count() -> None:
    argv = torchrun_argv(_spec(max_restarts=2, local_addr="198.18.0.2"))
    assert argv[:3] == ["/py", "-m", "torch.distributed.run"]
    assert _opt(argv, "--rdzv-backend") == "c10d"
    assert _opt(argv, "--rdzv-endpoint") == "n0:29400"
    assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--nproc-per-node") == "4"
    assert _opt(argv, "--max-restarts") == "2"
    assert _opt(argv, "--rdzv-conf") == "is_host=0"
    assert _opt(argv, "--local-addr") == "198.18.0.2"
    i = argv.index("--no-python")
    assert argv[i + 1:] == ["/py", "train.py", "--parts", "p p"]  # argument kept whole


def test_worker_command_runs_scripts_under_python_only() -> None:
    assert worker_command(["a.py", "x"], "/py") == ["/py", "a.py", "x"]
    assert worker_command(["python3", "a.py"], "/py") == ["python3", "a.py"]
    assert worker_command(["./run.sh"], "/py") == ["./run.sh"]


def test_agent_argv_sets_rank_prefix_and_runs_supervisor_by_path() -> None:
    argv = agent_argv(_spec(is_host=True, cwd="/w", env={"A": "1"}), check_port=29400)
    assert argv[0] == "env" and "A=1" in argv
    assert "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=[n1 rank ${rank}] " in argv
    i = argv.index("/py")
    assert argv[i + 1] == AGENT_SCRIPT and os.path.isfile(AGENT_SCRIPT)
    assert _opt(argv, "--label") == "n1" and _opt(argv, "--chdir") == "/w"
    assert _opt(argv, "--check-port") == "29400"
    assert argv[argv.index("--") + 1:] == torchrun_argv(_spec(is_host=True, cwd="/w",
                                                              env={"A": "1"}))


def test_ssh_argv_quotes_each_argument_for_the_remote_shell() -> None:
    remote = ["env", "X=a b", "python", "-c", "print('$HOME; rm -rf /')", "--", "a\"b"]
    argv = ssh_argv("user@n1", remote, port=2222, identity="/k", options=["StrictHostKeyChecking=no"])
    assert argv[0] == "ssh" and "BatchMode=yes" in argv
    assert _opt(argv, "-p") == "2222" and _opt(argv, "-i") == "/k"
    assert "StrictHostKeyChecking=no" in argv
    assert argv[-3:-1] == ["user@n1", "--"]
    assert shlex.split(argv[-1]) == remote  # what the remote shell will execute


def test_env_argv_and_forwarded_env() -> None:
    assert env_argv({}, ["a"]) == ["a"]
    assert env_argv({"K": "v w"}, ["a"]) == ["env", "K=v w", "a"]
    env = forwarded_env({"PATH": "/b", "HOME": "/root", "OMP_NUM_THREADS": "1", "SECRET": "x",
                         "GLOO_SOCKET_IFNAME": "eth0", "MALLOC_TRIM_THRESHOLD_": "9"},
                        ["EXTRA=1=2"])
    assert env == {"EXTRA": "1=2", "GLOO_SOCKET_IFNAME": "eth0", "MALLOC_TRIM_THRESHOLD_": "9",
                   "OMP_NUM_THREADS": "1", "PATH": "/b"}
    with pytest.raises(UsageError, match="NAME=VALUE"):
        forwarded_env({}, ["novalue"])


def test_cluster_commands_stay_inside_the_namespaces() -> None:
    plan = ClusterPlan(3, parse_rate("1gbit"), tag="t")
    cmds = setup_commands(plan)
    net = ipaddress.ip_network("198.18.0.0/15")
    for c in cmds:
        # every command names a namespace of this plan: nothing touches the host's own
        if c[:3] == ["ip", "netns", "add"]:
            assert c[3] in plan.namespaces
        else:
            assert c[0] in ("ip", "tc") and c[1] == "-n" and c[2] in plan.namespaces, c
    for i in range(3):
        assert ipaddress.ip_address(plan.addr(i)) in net
        ns = plan.ns(i)
        assert ["ip", "-n", ns, "addr", "add", f"{plan.addr(i)}/16", "dev", UPLINK] in cmds
        shaped = [c for c in cmds if c[0] == "tc" and "tbf" in c]
        assert any(c[2] == ns and c[6] == UPLINK for c in shaped)          # egress
        assert any(c[2] == plan.bridge_ns and c[6] == f"s{i}" for c in shaped)  # ingress
    assert len({plan.addr(i) for i in range(3)}) == 3
    assert sorted(c[3] for c in teardown_commands(plan)) == sorted(plan.namespaces)
    assert not [c for c in setup_commands(ClusterPlan(2, None, "u")) if c[0] == "tc"]


@pytest.mark.parametrize("rate", ["100mbit", "1gbit", "10gbit"])
def test_shaped_links_let_through_a_burst_of_one_millisecond(rate: str) -> None:
    # A wire has no burst: with 10 ms at full rate, exchanges of ~1 MB per server passed the
    # token bucket at the speed of the veth underneath and the planner's predictions (rate
    # model) came out 1.6-1.8x the measured times.
    bps = parse_rate(rate)
    assert bps is not None
    bursts = {int(c[c.index("burst") + 1]) for c in setup_commands(ClusterPlan(2, bps, tag="b"))
              if c[0] == "tc"}
    # 1 ms at full rate, at least 32 KiB
    assert bursts == {max(32 * 1024, round(bps / 8 * 1e-3))}


def test_parse_rate() -> None:
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("100mbit") == 10**8
    assert parse_rate("2.5gbit") == 25 * 10**8
    assert parse_rate("none") is None
    for bad in ("fast", "1 furlong", "10bit"):
        with pytest.raises(UsageError, match="link-rate"):
            parse_rate(bad)


def test_parse_hosts(tmp_path: Path) -> None:
    assert parse_hosts("a, b,c", None) == ["a", "b", "c"]
    assert parse_hosts(None, None) == []
    f = tmp_path / "hosts"
    f.write_text("# cluster\nn1 slots=4\n\nroot@n2  # second\n")
    assert parse_hosts(None, str(f)) == ["n1", "root@n2"]
    with pytest.raises(UsageError, match="listed twice"):
        parse_hosts("a,a", None)
    with pytest.raises(UsageError, match="no such file"):
        parse_hosts(None, str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="not both"):
        parse_hosts("a", str(f))


# -- supervisor and runner --------------------------------------------------------------------

TORCHRUN_REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-01-01_00:00:01
  host      : n1
  rank      : 3 (local_rank: 1)
  exitcode  : 1 (pid: 12)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-01-01_00:00:00
  host      : n1
  rank      : 2 (local_rank: 0)
  exitcode  : -9 (pid: 11)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 11
============================================================
"""


def test_failure_parser_prefers_the_rank_killed_by_a_signal() -> None:
    """torchrun lists the peers that failed because of the killed rank before it."""
    p = FailureParser()
    done = [p.feed(f"[n1] {line}"[5:]) for line in TORCHRUN_REPORT.splitlines()]
    assert done.count(True) == 2  # first rank 3 (exit 1), then the root cause
    assert (p.rank, p.exitcode) == (2, -9)
    p = FailureParser()
    for line in TORCHRUN_REPORT.replace("-9 (pid", "2 (pid").splitlines():
        p.feed(line)
    assert (p.rank, p.exitcode) == (3, 1)  # no signal: the first failure listed
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(2) == "exited with code 2"


def test_events_round_trip() -> None:
    assert parse_event(format_event(host="a", state="running")) == {"host": "a",
                                                                    "state": "running"}
    assert parse_event("[a rank 0] epoch 1") is None


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_runner_stops_every_host_when_one_fails(capsys: pytest.CaptureFixture[str]) -> None:
    fail = _py("""
        import time
        print('[h1 rank 3] epoch 1', flush=True)
        time.sleep(0.5)
        print('@gnnscale host=h1 failed_rank=3 exitcode=-9', flush=True)
        raise SystemExit(1)
    """)
    # stand-in agents: like the supervisor they stop when their stdin closes
    wait = _py("import sys; print('[h0 rank 0] epoch 1', flush=True); sys.stdin.read()")
    t0 = time.monotonic()
    code = run_hosts([HostRun("h0", wait), HostRun("h1", fail), HostRun("h2", wait)],
                     timeout=60)
    assert code == 1 and time.monotonic() - t0 < 20
    out, err = capsys.readouterr()
    assert "[h0 rank 0] epoch 1" in out and "[h1 rank 3] epoch 1" in out
    assert "gnnscale: error: host h1: rank 3 was killed by signal 9 (SIGKILL)" in err
    assert "stopping h0, h2" in err


def test_runner_kills_agents_that_ignore_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    stubborn = _py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "time.sleep(600)")
    t0 = time.monotonic()
    code = run_hosts([HostRun("h0", stubborn), HostRun("h1", _py("raise SystemExit(4)"))],
                     timeout=60, stop_timeout=4)
    assert code == 1 and time.monotonic() - t0 < 20
    assert "host h1: agent exited with code 4" in capsys.readouterr().err


def test_runner_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_hosts([HostRun("h0", _py("import sys; sys.stdin.read()"))], timeout=1)
    assert code == 1 and "timed out after 1 s" in capsys.readouterr().err


def test_supervisor_kills_orphaned_workers_when_stdin_closes(tmp_path: Path) -> None:
    """A 'torchrun' that starts a worker in its own session (as torchrun does) and is then
    stopped: the worker must not survive the supervisor."""
    pidfile = tmp_path / "worker.pid"
    fake_torchrun = textwrap.dedent(f"""
        import subprocess, sys, time
        w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
        open({str(pidfile)!r}, "w").write(str(w.pid))
        print("[x rank 0] started", flush=True)
        time.sleep(600)
    """)
    sup = subprocess.Popen([sys.executable, AGENT_SCRIPT, "--label", "x", "--grace", "2", "--",
                            sys.executable, "-c", fake_torchrun], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = int(pidfile.read_text())
        assert psutil.pid_exists(worker)
        assert sup.stdin is not None and sup.stdout is not None
        assert "[x rank 0] started" in sup.stdout.readline() + sup.stdout.readline()
        # the launcher went away: stdin closes and writing to stdout breaks
        sup.stdout.close()
        sup.stdin.close()
        sup.stdin = sup.stdout = None
        sup.communicate(timeout=30)
    finally:
        if sup.poll() is None:
            sup.kill()
    time.sleep(0.2)
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"


def test_supervisor_refuses_a_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, AGENT_SCRIPT, "--label", "x", "--check-port",
                            str(port), "--", "true"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and f"port_busy={port}" in r.stdout


# -- the command line -------------------------------------------------------------------------

def _launch(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["launch", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _alias_config(tmp_path: Path) -> Path:
    """An ssh config whose aliases only this launcher's ssh knows."""
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host gnsalias0\n    HostName 127.0.0.2\nHost gnsalias1\n    HostName 127.0.0.3\n")
    return cfg


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client")
def test_dry_run_prints_the_exact_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path
                                           ) -> None:
    cfg = _alias_config(tmp_path)
    code, out, _ = _launch(capsys, "--hosts", "gnsalias0,gnsalias1", "--ssh-config", str(cfg),
                           "-G", "2", "--port", "29411", "--dry-run", "--", "train.py",
                           "--parts", "my parts")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("ssh ") for line in lines)
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        remote = shlex.split(argv[-1])
        assert argv[-3] == f"gnsalias{i}" and _opt(argv, "-F") == str(cfg)
        # the peers get addresses: the aliases exist only in the launcher's ssh config
        assert _opt(remote, "--rdzv-endpoint") == "127.0.0.2:29411"
        assert _opt(remote, "--local-addr") == f"127.0.0.{i + 2}"
        assert f"[gnsalias{i} rank ${{rank}}] " in " ".join(remote)
        assert remote[-3:] == ["train.py", "--parts", "my parts"]
        assert ("--check-port" in remote) == (i == 0)

    code, out, _ = _launch(capsys, "--simulate-servers", "2", "-G", "2", "--dry-run", "--",
                           "train.py")
    assert code == 0
    assert "ip netns add" in out and "tbf rate 1000000000bit" in out
    assert out.count("ip netns exec") == 2 and "GLOO_SOCKET_IFNAME=gsup" in out
    assert "ip netns delete" in out

    code, out, _ = _launch(capsys, "-G", "3", "--dry-run", "--", "train.py")
    assert code == 0 and len(out.splitlines()) == 1 and "--nproc-per-node 3" in out
    assert "127.0.0.1:" in out


@pytest.mark.parametrize("argv, message", [
    (["-G", "2"], "missing command"),
    (["-G", "2", "--"], "missing command"),
    (["-G", "0", "--", "t.py"], "at least 1 process"),
    (["-G", "1", "--max-restarts", "-1", "--", "t.py"], "--max-restarts -1"),
    (["-G", "1", "--port", "70000", "--", "t.py"], "between 1 and 65535"),
    (["--simulate-servers", "0", "-G", "1", "--", "t.py"], "at least 1 server"),
    (["--simulate-servers", "500", "-G", "1", "--", "t.py"], "at most 200 servers"),
    (["--simulate-servers", "100", "-G", "100", "--", "t.py"], "more than this machine can hold"),
    (["-G", "100000", "--", "t.py"], "more than this machine can hold"),
    (["--simulate-servers", "2", "--hosts", "a", "-G", "1", "--", "t.py"], "drop --hosts"),
    (["--simulate-servers", "2", "--link-rate", "warp", "-G", "1", "--", "t.py"],
     "--link-rate 'warp'"),
    (["--hosts", "no-such-host.invalid", "-G", "1", "--", "t.py"], "unknown host"),
    (["--hosts", "a", "--ssh-config", "no-such-dir/cfg", "-G", "1", "--", "t.py"],
     "--ssh-config no-such-dir/cfg: no such file"),
])
def test_bad_input_fails_fast_with_one_line(capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    t0 = time.monotonic()
    code, out, err = _launch(capsys, *argv)
    assert code == 2 and time.monotonic() - t0 < 10
    assert err.startswith("gnnscale: error: ") and message in err, err


def test_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = _launch(capsys, "-G", "1", "--port", str(port), "--", "t.py")
    assert code == 2 and f"--port {port} is in use" in err


def test_simulation_needs_root_and_iproute2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        cluster_mod.check_can_simulate(10**9)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster_mod.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="iproute2"):
        cluster_mod.check_can_simulate(10**9)


def test_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    out = capsys.readouterr().out
    for opt in ("--hosts", "--hostfile", "--nproc-per-node", "--max-restarts", "--dry-run",
                "--simulate-servers", "--link-rate", "--port"):
        assert opt in out


def test_plan_hosts_forwards_env_only_over_ssh() -> None:
    p = argparse.ArgumentParser()
    launch_main.add_arguments(p)
    args = p.parse_args(["--hosts", "a,me@b", "-G", "1", "--env", "K=v", "--", "t.py"])
    runs, plan = launch_main.plan_hosts(args, ["t.py"], environ={"OMP_NUM_THREADS": "2",
                                                                 "HOME": "/r"})
    assert plan is None and [r.label for r in runs] == ["a", "b"]
    remote = shlex.split(runs[1].argv[-1])
    assert "OMP_NUM_THREADS=2" in remote and "K=v" in remote
    assert not any(a.startswith("HOME=") for a in remote)


def test_plan_hosts_gives_peers_addresses_not_aliases() -> None:
    """Pure: the resolved addresses go to torchrun; ssh keeps the names it was given."""
    p = argparse.ArgumentParser()
    launch_main.add_arguments(p)
    args = p.parse_args(["--hosts", "a,me@b", "--ssh-config", "cfg", "-G", "1", "--port", "7",
                         "--", "t.py"])
    runs, _ = launch_main.plan_hosts(args, ["t.py"], environ={},
                                     addresses={"a": "10.1.2.3", "me@b": "fd00::2"})
    for run, target, addr in zip(runs, ("a", "me@b"), ("10.1.2.3", "fd00::2")):
        remote = shlex.split(run.argv[-1])
        assert run.argv[-3] == target and _opt(run.argv, "-F") == "cfg"
        assert _opt(remote, "--rdzv-endpoint") == "10.1.2.3:7"
        assert _opt(remote, "--local-addr") == addr
    p2 = argparse.ArgumentParser()
    launch_main.add_arguments(p2)
    runs, _ = launch_main.plan_hosts(p2.parse_args(["--hosts", "b,a", "-G", "1", "--", "t.py"]),
                                     ["t.py"], environ={}, addresses={"b": "fd00::2"})
    assert _opt(shlex.split(runs[1].argv[-1]), "--rdzv-endpoint") == "[fd00::2]:29400"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client")
def test_ssh_aliases_resolve_to_addresses(tmp_path: Path) -> None:
    assert ssh_hostname("me@alias", ["Hostname=localhost"]) == "localhost"
    # the alias itself is in no DNS: ssh's host name for it is resolved
    assert resolve_hosts(["alias", "me@x"], ["Hostname=127.0.0.1"]) == {"alias": "127.0.0.1",
                                                                          "me@x": "127.0.0.1"}
    cfg = _alias_config(tmp_path)
    assert resolve_hosts(["gnsalias1", "u@gnsalias0"], ssh_config=str(cfg)) == {
        "gnsalias1": "127.0.0.3", "u@gnsalias0": "127.0.0.2"}
    with pytest.raises(UsageError, match="unknown host 'alias' \\(ssh: nowhere.invalid\\)"):
        resolve_hosts(["alias"], ["Hostname=nowhere.invalid"])


def test_runner_does_not_wait_for_strays_holding_its_pipes(tmp_path: Path) -> None:
    pidfile = tmp_path / "stray.pid"
    leaves_stray = _py(f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             start_new_session=True)  # inherits stdout and stderr
        open({str(pidfile)!r}, "w").write(str(p.pid))
    """)
    t0 = time.monotonic()
    try:
        assert run_hosts([HostRun("h0", leaves_stray)], timeout=60, linger=1) == 0
        assert time.monotonic() - t0 < 20
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
