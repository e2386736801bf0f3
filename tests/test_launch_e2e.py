"""End to end: `gnnscale launch` starting real torchrun agents and gloo workers.

- on this machine (no hosts): a killed rank stops the job and is named;
- on a simulated cluster (network namespaces, needs root + iproute2): 2 servers x 2 processes
  train examples/train_dist.py to the same losses and test accuracy as examples/train.py in one
  process; a rank killed from outside with SIGKILL stops every agent within 60 s; with
  --max-restarts 1 a job with dropout on, killed, resumes from its checkpoint and ends with the
  parameters of an uninterrupted single-process run (2 and 3 ranks).

Every test checks that no worker process and no namespace of its launcher is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from gnnscale.launch.cluster import ClusterPlan, SimulatedCluster
from gnnscale.partition import PartitionOptions, partition_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GRAPH = "synthetic:tiny"
EPOCHS = 20

pytestmark = pytest.mark.timeout(300)


def _netns_ok() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    name = f"gnsprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return ok


needs_netns = pytest.mark.skipif(not _netns_ok(),
                                 reason="network namespaces need root and iproute2")

# A training job that checkpoints, can kill one of its ranks and saves its final parameters.
JOB = """
import argparse, os, signal, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, {examples!r})
from models import build
import gnnscale

p = argparse.ArgumentParser()
p.add_argument("--parts"); p.add_argument("--epochs", type=int); p.add_argument("--ckpt")
p.add_argument("--every", type=int, default=3); p.add_argument("--out")
p.add_argument("--die-rank", type=int, default=-1); p.add_argument("--die-at", type=int, default=-1)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--dropout", type=float, default=0.5)
a = p.parse_args()
rank = int(os.environ.get("RANK", "0"))
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
# Seeds per rank and per restart: wrap starts every rank from rank 0's weights, and a restarted
# process draws other weights and another dropout seed, which the checkpoint must bring back,
# with the dropout call counters.
torch.manual_seed(1000 * restart + rank)
gnnscale.init()
part = gnnscale.load_partition(a.parts)
g, feat, label = part.graph, part.ndata["feat"].double(), part.ndata["label"]
train = part.ndata["train_mask"].bool()
n = int(train.sum())
model = gnnscale.wrap(build("gcn", feat.shape[1], part.meta["num_classes"], a.dropout).double(),
                      part)
opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)
ckpt = gnnscale.Checkpointer(a.ckpt, every=a.every)
start = ckpt.restore(model, opt)
gnnscale.print0(f"start at epoch {{start}} (restart {{restart}})")
for epoch in range(start, a.epochs):
    model.train()
    loss = F.cross_entropy(model(g, feat)[train], label[train])
    opt.zero_grad()
    loss.backward()
    gnnscale.sync_gradients(model, num_samples=n)
    opt.step()
    ckpt.step(epoch, model, opt)
    gnnscale.print0(f"epoch {{epoch + 1}} loss {{gnnscale.global_mean(loss, n):.6f}}")
    if start == 0 and rank == a.die_rank and epoch + 1 == a.die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(a.sleep)
if rank == 0 and a.out:
    torch.save({{k: v.detach().clone() for k, v in model.state_dict().items()}}, a.out)
gnnscale.shutdown()
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("launch-parts")
    out = {}
    for k in (1, 2, 3, 4):
        out[k] = base / f"p{k}"
        partition_spec(GRAPH, str(out[k]), PartitionOptions(parts=k, progress=False),
                       add_self_loops=True)
    return out


@pytest.fixture()
def job(tmp_path: Path) -> Path:
    script = tmp_path / "job.py"
    script.write_text(JOB.format(examples=str(EXAMPLES)))
    return script


def _ctrl_c_default() -> None:
    """Ctrl-C as at a terminal: a shell without job control starts background jobs (CI's, say)
    with SIGINT ignored, and Python then keeps ignoring it — the launcher would never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Launcher:
    """`python -m gnnscale launch ...` with its output collected line by line."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "gnnscale", "launch", *argv], cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_ctrl_c_default,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                        for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _read(stream: object, dst: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            dst.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in self.out):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"no line matching {pattern!r}; stderr:\n" + "\n".join(self.err[-40:]))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"launcher still running after {timeout} s; stderr:\n"
                        + "\n".join(self.err[-40:]))
        for t in self.threads:
            t.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the launcher stops everything on Ctrl-C
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)


def _leftovers(marker: str, launcher_pid: int) -> tuple[list[str], list[str]]:
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and "pytest" not in cmd:
            procs.append(f"{p.info['pid']}: {cmd}")
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout \
        if shutil.which("ip") else ""
    spaces = [line.split()[0] for line in ns.splitlines()
              if line.startswith(f"gns{launcher_pid}")]
    return procs, spaces


def _assert_clean(marker: str, launcher_pid: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        procs, spaces = _leftovers(marker, launcher_pid)
        if not procs and not spaces or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not procs, f"worker processes left behind: {procs}"
    assert not spaces, f"namespaces left behind: {spaces}"


_LOG = re.compile(r"epoch\s+(\d+)\s+loss\s+([0-9.]+)\s+train\s+([0-9.]+)\s+val\s+([0-9.]+)")
_ACC = re.compile(r"test accuracy ([0-9.]+)")


def _curve(lines: list[str]) -> tuple[list[tuple[str, ...]], list[str]]:
    return ([m.groups() for m in map(_LOG.search, lines) if m],
            [m.group(1) for m in map(_ACC.search, lines) if m])


@pytest.fixture(scope="module")
def single() -> list[str]:
    """The oracle: examples/train.py on the whole graph in one process."""
    r = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--graph", GRAPH,
                        "--epochs", str(EPOCHS), "--dropout", "0", "--log-every", "5"],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@needs_netns
def test_simulated_2x2_matches_single_process(parts: dict[int, Path], single: list[str]
                                              ) -> None:
    run = Launcher("--simulate-servers", "2", "-G", "2", "--link-rate", "1gbit",
                   "--timeout", "240", "--", "examples/train_dist.py", "--parts",
                   str(parts[4]), "--epochs", str(EPOCHS), "--dropout", "0", "--log-every", "5")
    code = run.wait(280)
    assert code == 0, run.stderr
    rank0 = [line for line in run.out if re.match(r"\[server\d rank 0\] ", line)]
    expected, expected_acc = _curve(single)
    got, got_acc = _curve(rank0)
    assert len(expected) == EPOCHS // 5 and expected_acc
    assert got == expected and got_acc == expected_acc, (single, run.out)
    for state in ("starting", "rendezvous", "running", "exited"):
        assert f"[server1] {state}" in run.stderr
    assert f"rank 0 reached epoch {EPOCHS}" in run.stderr
    _assert_clean(str(parts[4]), run.proc.pid)


def _kill_rank(script: Path, rank: int) -> int:
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if str(script) in cmd and "torch.distributed.run" not in cmd:
            try:
                if p.environ().get("RANK") == str(rank):
                    p.send_signal(signal.SIGKILL)
                    return int(p.info["pid"])
            except psutil.Error:
                continue
    pytest.fail(f"rank {rank} of {script} not found")


@needs_netns
def test_sigkill_of_one_rank_stops_the_whole_cluster(parts: dict[int, Path], job: Path,
                                                     tmp_path: Path) -> None:
    run = Launcher("--simulate-servers", "2", "-G", "2", "--timeout", "240", "--", str(job),
                   "--parts", str(parts[4]), "--epochs", "1000", "--sleep", "0.2",
                   "--ckpt", str(tmp_path / "ckpt.pt"), "--every", "0")
    run.wait_for(r"rank 0\] epoch 3 ", 200)
    _kill_rank(job, 1)
    t0 = time.monotonic()
    code = run.wait(90)
    assert time.monotonic() - t0 < 60, "the launcher took over 60 s to stop the job"
    assert code != 0
    assert re.search(r"gnnscale: error: host server\d: rank 1 was killed by signal 9 "
                     r"\(SIGKILL\)", run.stderr), run.stderr
    _assert_clean(str(job), run.proc.pid)


def test_local_failure_names_the_rank(parts: dict[int, Path], job: Path, tmp_path: Path
                                      ) -> None:
    run = Launcher("-G", "2", "--label", "here", "--timeout", "200", "--", str(job), "--parts",
                   str(parts[2]), "--epochs", "50", "--ckpt", str(tmp_path / "c.pt"),
                   "--every", "0", "--die-rank", "0", "--die-at", "2")
    code = run.wait(240)
    assert code == 1
    assert "gnnscale: error: host here: rank 0 was killed by signal 9 (SIGKILL)" in run.stderr
    assert any(line.startswith("[here rank 0] epoch 2 ") for line in run.out)
    _assert_clean(str(job), run.proc.pid)


def _transport(k: int = 2) -> list[str]:
    """k agents of one process each on simulated servers, or k processes here."""
    return ["--simulate-servers", str(k), "-G", "1"] if _netns_ok() else ["-G", str(k)]


@pytest.fixture(scope="module")
def uninterrupted(parts: dict[int, Path], tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, torch.Tensor]:
    """The oracle: the same job in one process on the whole graph (float64, dropout 0.5),
    never interrupted; its final parameters."""
    tmp = tmp_path_factory.mktemp("oracle")
    script = tmp / "job.py"
    script.write_text(JOB.format(examples=str(EXAMPLES)))
    r = subprocess.run([sys.executable, str(script), "--parts", str(parts[1]), "--epochs", "12",
                        "--every", "3", "--ckpt", str(tmp / "c.pt"), "--out",
                        str(tmp / "params.pt")], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    params: dict[str, torch.Tensor] = torch.load(tmp / "params.pt")
    return params


@pytest.mark.parametrize("k", [2, 3])
def test_max_restarts_resumes_from_checkpoint(parts: dict[int, Path], job: Path, tmp_path: Path,
                                              uninterrupted: dict[str, torch.Tensor], k: int
                                              ) -> None:
    """Dropout 0.5 on: the last rank dies after epoch 7 (checkpoints after 3, 6, 9); the job
    restarts (with another torch seed), resumes at epoch 6 and ends with the parameters of a
    run that was never interrupted, one process on the whole graph (relative error <= 1e-10
    in float64)."""
    run = Launcher(*_transport(k), "--max-restarts", "1", "--timeout", "200", "--", str(job),
                   "--parts", str(parts[k]), "--epochs", "12", "--every", "3",
                   "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "params.pt"),
                   "--die-rank", str(k - 1), "--die-at", "7")
    assert run.wait(240) == 0, run.stderr
    # every agent restarts its workers (torchrun counts a restart only where one failed)
    assert any(re.search(r"rank 0\] start at epoch 6 \(restart \d\)", line)
               for line in run.out), run.out
    assert any(re.search(r"rank 0\] epoch 7 ", line) for line in run.out)
    params = torch.load(tmp_path / "params.pt")
    assert params.keys() == uninterrupted.keys()
    for key, want in uninterrupted.items():
        rel = float((params[key] - want).abs().max() / want.abs().max())
        assert rel <= 1e-10, f"{key}: relative error {rel:.2e}"
    _assert_clean(str(job), run.proc.pid)


# -- the ssh transport, against real sshd servers inside simulated servers ----------------------

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
needs_sshd = pytest.mark.skipif(SSHD is None or shutil.which("ssh-keygen") is None
                                or shutil.which("ssh") is None,
                                reason="needs openssh-server and openssh-client (.ci/run "
                                       "installs them)")
SSH_PORT = 2222


@pytest.fixture()
def ssh_cluster(tmp_path: Path) -> Iterator[tuple[ClusterPlan, list[str]]]:
    """Two servers running sshd (keys in a temp dir) and a client namespace; all removed."""
    key, host_key = tmp_path / "id_ed25519", tmp_path / "host_ed25519"
    for k in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)],
                       check=True, timeout=30)
    (tmp_path / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    plan = ClusterPlan(3, 10**9, tag=str(os.getpid()))
    opts = ["--ssh-port", str(SSH_PORT), "--ssh-identity", str(key),
            # test hosts only: fresh host keys every run
            "--ssh-option", "StrictHostKeyChecking=no",
            "--ssh-option", "UserKnownHostsFile=/dev/null", "--ssh-option", "LogLevel=ERROR"]
    daemons = []
    with SimulatedCluster(plan):
        try:
            for i in range(2):
                cfg = tmp_path / f"sshd_config{i}"
                cfg.write_text(textwrap.dedent(f"""\
                    Port {SSH_PORT}
                    ListenAddress {plan.addr(i)}
                    HostKey {host_key}
                    PidFile {tmp_path}/sshd{i}.pid
                    AuthorizedKeysFile {tmp_path}/authorized_keys
                    PermitRootLogin prohibit-password
                    PasswordAuthentication no
                    KbdInteractiveAuthentication no
                    UsePAM no
                    StrictModes no
                    """))
                daemons.append(subprocess.Popen(
                    ["ip", "netns", "exec", plan.ns(i), str(SSHD), "-D", "-e", "-f", str(cfg)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for i in range(2):  # wait until each sshd accepts our key
                deadline = time.monotonic() + 30
                while True:
                    r = subprocess.run(
                        ["ip", "netns", "exec", plan.ns(2), "ssh", "-T", "-o", "BatchMode=yes",
                         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                         "-o", "LogLevel=ERROR", "-p", str(SSH_PORT), "-i", str(key),
                         plan.addr(i), "true"], capture_output=True, text=True, timeout=30)
                    if r.returncode == 0:
                        break
                    if time.monotonic() > deadline:
                        pytest.fail(f"sshd on {plan.addr(i)} did not come up: {r.stderr}")
                    time.sleep(0.3)
            yield plan, opts
        finally:
            for d in daemons:
                d.terminate()
            for d in daemons:
                try:
                    d.wait(10)
                except subprocess.TimeoutExpired:
                    d.kill()


def _launch_in(ns: str, *argv: str) -> Launcher:
    return Launcher(*argv, prefix=["ip", "netns", "exec", ns])


@needs_netns
@needs_sshd
def test_ssh_2x2_matches_single_process(parts: dict[int, Path], single: list[str],
                                        ssh_cluster: tuple[ClusterPlan, list[str]],
                                        tmp_path: Path) -> None:
    """The hosts are aliases of an ssh config: only the launcher's ssh can resolve them, so
    the agents must be given addresses (the rendezvous endpoint, MASTER_ADDR)."""
    plan, opts = ssh_cluster
    config = tmp_path / "ssh_config"
    config.write_text("".join(f"Host gnsalias{i}\n    HostName {plan.addr(i)}\n" for i in range(2))
                      + f"Host *\n    Port {SSH_PORT}\n    IdentityFile {tmp_path / 'id_ed25519'}\n"
                      "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
                      "    LogLevel ERROR\n")
    run = _launch_in(plan.ns(2), "--hosts", "gnsalias0,gnsalias1", "--ssh-config", str(config),
                     "-G", "2", "--env", "GLOO_SOCKET_IFNAME=gsup", "--timeout", "240", "--",
                     "examples/train_dist.py", "--parts", str(parts[4]), "--epochs",
                     str(EPOCHS), "--dropout", "0", "--log-every", "5")
    code = run.wait(280)
    assert code == 0, run.stderr
    rank0 = [line for line in run.out if line.startswith("[gnsalias0 rank 0] ")]
    assert _curve(rank0) == _curve(single), (single, run.out)
    assert "[gnsalias1] running" in run.stderr
    _assert_clean(str(parts[4]), run.proc.pid)

    # an unreachable host (nothing listens there) fails within seconds, naming the host
    t0 = time.monotonic()
    bad = _launch_in(plan.ns(2), "--hosts", f"{plan.addr(0)},{plan.addr(2)}", "-G", "1", *opts,
                     "--", "examples/train_dist.py", "--parts", str(parts[2]))
    assert bad.wait(120) != 0
    assert time.monotonic() - t0 < 60
    assert f"gnnscale: error: host {plan.addr(2)}: ssh failed" in bad.stderr, bad.stderr
    _assert_clean(str(parts[2]), bad.proc.pid)


def test_ctrl_c_stops_every_agent_and_removes_the_cluster(parts: dict[int, Path], job: Path,
                                                          tmp_path: Path) -> None:
    run = Launcher(*_transport(), "--timeout", "240", "--", str(job), "--parts", str(parts[2]),
                   "--epochs", "1000", "--sleep", "0.2", "--ckpt", str(tmp_path / "c.pt"),
                   "--every", "0")
    run.wait_for(r"rank 0\] epoch 2 ", 200)
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(90) == 130
    assert time.monotonic() - t0 < 60
    assert "gnnscale: interrupted; stopped every agent" in run.stderr
    _assert_clean(str(job), run.proc.pid)


@needs_netns
def test_cluster_is_removed_after_a_failed_setup_and_stale_ones_are_swept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gnnscale.launch import cluster as cl

    dead = f"gns{4194304 + os.getpid()}b"  # above any pid_max: its launcher is surely gone
    subprocess.run(["ip", "netns", "add", dead], check=True)
    plan = ClusterPlan(2, 10**9, tag=str(os.getpid()))
    good = cl.setup_commands
    monkeypatch.setattr(cl, "setup_commands",
                        lambda p: good(p) + [["ip", "-n", p.ns(1), "link", "set", "nope", "up"]])
    try:
        with pytest.raises(cl.GnnscaleError, match="could not build the simulated cluster"), \
                SimulatedCluster(plan):
            pass
    finally:
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        subprocess.run(["ip", "netns", "delete", dead], capture_output=True)
    assert dead not in left
    assert not [ns for ns in plan.namespaces if ns in left.split()]
