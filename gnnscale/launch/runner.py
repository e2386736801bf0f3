"""Run one agent per host, merge their prefixed output, report state, and stop every agent on
every host as soon as one fails, the time runs out or the user presses Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from .events import PORT_BUSY, parse_event

__all__ = ["HostRun", "Failure", "run_hosts", "describe_exit"]

_EPOCH = re.compile(r"\bepoch\s+(\d+)")


@dataclass
class Failure:
    host: str
    rank: int | None
    exitcode: int | None  # torchrun's: negative = killed by that signal
    agent_code: int | None
    detail: str = ""
    order: float = field(default_factory=time.monotonic)

    def message(self) -> str:
        if self.rank is not None and self.exitcode is not None:
            return f"host {self.host}: rank {self.rank} {describe_exit(self.exitcode)}"
        return f"host {self.host}: {self.detail or 'agent ' + describe_exit(self.agent_code or 0)}"


def describe_exit(code: int) -> str:
    """``exited with code 3`` / ``was killed by signal 9 (SIGKILL)`` (negative = signal)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


@dataclass
class HostRun:
    """One host's agent command and what the launcher knows about it."""

    label: str
    argv: list[str]
    transport: str = "local"
    state: str = "starting"
    proc: subprocess.Popen[bytes] | None = None
    code: int | None = None
    failure: tuple[int, int] | None = None  # (rank, exitcode) reported by the agent
    last_err: str = ""
    port_busy: int | None = None


class _Job:
    def __init__(self, hosts: Sequence[HostRun], out: IO[str], err: IO[str], status: bool,
                 stop_timeout: float) -> None:
        self.hosts, self.out, self.err = list(hosts), out, err
        self.status, self.stop_timeout = status, stop_timeout
        self.q: queue.Queue[tuple[int, str, str | None]] = queue.Queue()
        self.failures: list[Failure] = []
        self.stopping_since: float | None = None
        self.epoch: int | None = None
        self.stop_at: float | None = None
        self.root_cause_wait = 3.0
        self.linger = 10.0  # how long output may still arrive after every agent exited

    def say(self, msg: str) -> None:
        if self.status:
            self.err.write(f"gnnscale launch: {msg}\n")
            self.err.flush()

    def start(self) -> None:
        for i, h in enumerate(self.hosts):
            h.proc = subprocess.Popen(h.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True)
            self.say(f"[{h.label}] starting")
            for name, stream in (("out", h.proc.stdout), ("err", h.proc.stderr)):
                threading.Thread(target=self._read, args=(i, name, stream), daemon=True).start()

    def _read(self, i: int, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.q.put((i, name, raw.decode(errors="replace").rstrip("\n")))
        self.q.put((i, name, None))

    def handle(self, i: int, name: str, line: str) -> None:
        h = self.hosts[i]
        ev = parse_event(line)
        if ev is not None:
            if "state" in ev and ev["state"] != h.state:
                h.state = ev["state"]
                code = f" (status {ev['code']})" if "code" in ev else ""
                self.say(f"[{h.label}] {h.state}{code}")
            if "failed_rank" in ev:
                h.failure = (int(ev["failed_rank"]), int(ev["exitcode"]))
            if "port_busy" in ev:
                h.port_busy = int(ev["port_busy"])
            return
        if name == "err":
            if line.strip():
                h.last_err = line.strip()
            self.err.write(line + "\n")
            self.err.flush()
            return
        if " rank 0] " in line:
            m = _EPOCH.search(line)
            if m:
                self.epoch = int(m.group(1))
        self.out.write(line + "\n")
        self.out.flush()

    def exited(self, h: HostRun, code: int) -> None:
        h.code = code
        if h.state != "exited":
            h.state = "exited"
            self.say(f"[{h.label}] exited (status {code})")
        if code == 0 or self.stopping_since is not None and h.failure is None:
            return
        if h.port_busy is not None:
            detail = (f"rendezvous port {h.port_busy} is in use; pick another with --port")
        elif h.transport == "ssh" and code == 255:
            detail = f"ssh failed: {h.last_err or 'no message'}"
        else:
            detail = ""
        rank, exitcode = h.failure if h.failure else (None, None)
        self.failures.append(Failure(h.label, rank, exitcode, code, detail))
        # A rank killed by a signal is the root cause; other failures are often its echo
        # (peers losing their connection), so give the root cause a moment to be reported.
        delay = 0.0 if exitcode is not None and exitcode < 0 else self.root_cause_wait
        at = time.monotonic() + delay
        self.stop_at = at if self.stop_at is None else min(self.stop_at, at)

    def stop(self, why: str) -> None:
        if self.stopping_since is not None:
            return
        self.stopping_since = time.monotonic()
        running = [h.label for h in self.hosts if h.proc and h.proc.poll() is None]
        if running:
            self.say(f"{why}; stopping {', '.join(running)}")
        for h in self.hosts:
            if h.proc and h.proc.poll() is None and h.proc.stdin:
                with contextlib.suppress(OSError):
                    h.proc.stdin.close()  # the agent stops torchrun when its stdin closes

    def escalate(self) -> None:
        """After the agents' own grace period: signal the transports, then kill them."""
        assert self.stopping_since is not None
        waited = time.monotonic() - self.stopping_since
        sig = (signal.SIGKILL if waited > self.stop_timeout else
               signal.SIGTERM if waited > self.stop_timeout / 2 else None)
        if sig is None:
            return
        for h in self.hosts:
            if h.proc and h.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(h.proc.pid, sig)

    def run(self, timeout: float | None) -> int:
        self.start()
        open_streams = 2 * len(self.hosts)
        deadline = None if timeout is None else time.monotonic() + timeout
        all_exited: float | None = None
        try:
            while open_streams or any(h.code is None for h in self.hosts):
                try:
                    i, name, line = self.q.get(timeout=0.2)
                    if line is None:
                        open_streams -= 1
                    else:
                        self.handle(i, name, line)
                except queue.Empty:
                    pass
                for h in self.hosts:
                    assert h.proc is not None
                    if h.code is None and h.proc.poll() is not None:
                        self.exited(h, h.proc.returncode)
                if deadline is not None and time.monotonic() > deadline:
                    self.failures.append(Failure("*", None, None, None,
                                                 f"timed out after {timeout:g} s"))
                    deadline = None
                    self.stop("time is up")
                if self.stop_at is not None and time.monotonic() >= self.stop_at:
                    self.stop("a host failed")
                if self.stopping_since is not None:
                    self.escalate()
                if all(h.code is not None for h in self.hosts):
                    all_exited = all_exited or time.monotonic()
                    if time.monotonic() - all_exited > self.linger:
                        break  # a stray grandchild holds a pipe open; nothing left to wait for
        except KeyboardInterrupt:
            self.stop("interrupted")
            self.wait_all()
            self.err.write("gnnscale: interrupted; stopped every agent\n")
            return 130
        return self.summary()

    def wait_all(self) -> None:
        while any(h.proc and h.proc.poll() is None for h in self.hosts):
            self.escalate()
            time.sleep(0.2)
        for h in self.hosts:
            if h.code is None and h.proc is not None:
                h.code = h.proc.returncode

    def summary(self) -> int:
        if not self.failures:
            tail = f"; rank 0 reached epoch {self.epoch}" if self.epoch is not None else ""
            self.say(f"all {len(self.hosts)} host(s) finished{tail}")
            return 0
        # the root cause: a rank killed by a signal, else the first failure seen
        ranked = sorted(self.failures, key=lambda f: (
            not (f.exitcode is not None and f.exitcode < 0), f.rank is None, f.order))
        first = ranked[0]
        others = [f.message() for f in ranked[1:]]
        extra = f" (also: {'; '.join(others)})" if others else ""
        self.err.write(f"gnnscale: error: {first.message()}; stopped all agents{extra}\n")
        self.err.flush()
        return 2 if first.agent_code == PORT_BUSY and first.rank is None else 1


def run_hosts(hosts: Sequence[HostRun], *, timeout: float | None = None,
              out: IO[str] | None = None, err: IO[str] | None = None, status: bool = True,
              stop_timeout: float = 40.0, linger: float = 10.0) -> int:
    """Run every host's agent command; return 0 when all succeed, else non-zero after every
    agent was stopped. Ctrl-C stops all agents and returns 130."""
    job = _Job(hosts, out or sys.stdout, err or sys.stderr, status, stop_timeout)
    job.linger = linger
    return job.run(timeout)
