"""Per-host supervisor of one torchrun agent: ``python .../gnnscale/launch/agent.py``.

It runs as a script (by path, not ``-m``) so that it imports only the standard library and
psutil: importing the ``gnnscale`` package would load torch and DGL, seconds per host.

The launcher starts it on every host (directly, in a network namespace or over ssh) and talks to
it through its standard streams:

- it runs torchrun in its own session and copies torchrun's output, prefixing torchrun's own
  lines with ``[LABEL]`` (worker lines already carry ``[LABEL rank R]``);
- it reports state changes and the first failed rank as lines ``@gnnscale KEY=VALUE ...`` on
  stdout, which the launcher consumes;
- when its stdin closes (the launcher or the ssh connection went away) or it receives
  SIGTERM/SIGINT/SIGHUP it stops torchrun (SIGTERM, then SIGKILL after a grace period);
- it is a child subreaper, so workers orphaned by a dying torchrun stay its descendants, and it
  SIGKILLs whatever descendant is left before it exits: no worker outlives it.

Exit status: torchrun's, 128+N when torchrun died of signal N, 3 when ``--check-port`` is busy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO

import psutil

try:
    from .events import PORT_BUSY, format_event
except ImportError:  # run as a script: events.py is in this script's folder (sys.path[0])
    from events import PORT_BUSY, format_event  # type: ignore[no-redef]

__all__ = ["main", "FailureParser"]

_PR_SET_CHILD_SUBREAPER = 36
# torchrun's INFO log lines (needed to follow its state) are hidden from the job's output
_INFO = re.compile(r"^\[[\d\- :,]+\] torch\.distributed\.[\w.]+: \[INFO\]")

# torchrun's (INFO level) log lines that mark a state change of the agent
_STATES = [
    (re.compile(r"attempts to join the next round of the rendezvous|Rendezvous'ing"), "rendezvous"),
    (re.compile(r"Starting worker group"), "running"),
    (re.compile(r"Restarting worker group|Worker group failed"), "restarting"),
]


class FailureParser:
    """Reads torchrun's ChildFailedError report and keeps the root-cause rank: the first one
    killed by a signal, else the first failed one. When a rank is killed, its peers often fail
    too (their collectives break) and may be listed before it.

    The report holds blocks like ``rank : 1 (local_rank: 1)``, ``exitcode : -9 (pid: 7)``.
    """

    _rank = re.compile(r"^\s*rank\s*:\s*(\d+)")
    _code = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")

    def __init__(self) -> None:
        self.rank: int | None = None
        self.exitcode: int | None = None
        self._pending: int | None = None

    def feed(self, line: str) -> bool:
        """Parse one line; True when it changed the root-cause failure."""
        m = self._rank.match(line)
        if m:
            self._pending = int(m.group(1))
            return False
        m = self._code.match(line)
        if not m or self._pending is None:
            return False
        rank, code = self._pending, int(m.group(1))
        self._pending = None
        if self.exitcode is None or (code < 0 <= self.exitcode):
            self.rank, self.exitcode = rank, code
            return True
        return False


def _subreaper() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


class _Supervisor:
    def __init__(self, label: str, argv: Sequence[str], grace: float, verbose: bool) -> None:
        self.label, self.grace, self.verbose = label, grace, verbose
        self.lock = threading.RLock()  # also taken in signal handlers (via stop)
        self.stopping = threading.Event()
        self.state = "starting"
        self.failure = FailureParser()
        self.known: dict[int, psutil.Process] = {}
        env = {**os.environ, "LOGLEVEL": "INFO"}
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, env=env)
        self.emit(state="starting", pid=os.getpid())

    def write(self, dst: IO[str], line: str) -> None:
        """Write one line; a launcher that went away (broken pipe) must not stop us from
        draining torchrun's output and shutting it down."""
        with self.lock, contextlib.suppress(OSError, ValueError):
            dst.write(line + "\n")
            dst.flush()

    def emit(self, **fields: object) -> None:
        self.write(sys.stdout, format_event(host=self.label, **fields))

    def copy(self, src: IO[bytes], dst: IO[str]) -> None:
        prefix = f"[{self.label}"
        for raw in iter(src.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            for pattern, state in _STATES:
                if pattern.search(line) and self.state != state:
                    self.state = state
                    self.emit(state=state)
            if _INFO.match(line) and not self.verbose:
                continue
            if self.failure.feed(line):
                self.emit(failed_rank=self.failure.rank, exitcode=self.failure.exitcode)
            if not line.startswith(prefix):
                line = f"[{self.label}] {line}"
            self.write(dst, line)

    def track(self) -> None:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process().children(recursive=True):
                self.known.setdefault(p.pid, p)

    def stop(self, why: str) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.emit(stopping=why.replace(" ", "_"))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def kill_leftovers(self) -> None:
        self.track()
        for p in self.known.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        with contextlib.suppress(psutil.Error):
            psutil.wait_procs(list(self.known.values()), timeout=5)
        # reap zombies reparented to us
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    def run(self) -> int:
        threads = [threading.Thread(target=self.copy, args=(self.proc.stdout, sys.stdout),
                                    daemon=True),
                   threading.Thread(target=self.copy, args=(self.proc.stderr, sys.stderr),
                                    daemon=True)]
        for t in threads:
            t.start()
        deadline: float | None = None
        while self.proc.poll() is None:
            self.track()
            if self.stopping.is_set():
                deadline = deadline or time.monotonic() + self.grace
                if time.monotonic() > deadline:
                    self.kill_leftovers()
            time.sleep(0.2)
        self.kill_leftovers()  # first: a leftover worker would hold the output pipes open
        for t in threads:
            t.join(timeout=5)
        code = self.proc.returncode
        code = 128 - code if code < 0 else code
        self.emit(state="exited", code=code)
        return code


def _watch_stdin(sup: _Supervisor) -> None:
    with contextlib.suppress(OSError):
        while os.read(0, 4096):  # raw reads: no buffer lock held at interpreter exit
            pass
    sup.stop("launcher gone")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gnnscale/launch/agent.py",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="host name for output prefixes")
    p.add_argument("--chdir", help="working directory")
    p.add_argument("--check-port", type=int, help="exit 3 if this TCP port is taken")
    p.add_argument("--grace", type=float, default=15.0,
                   help="seconds between SIGTERM and SIGKILL when stopping (default 15)")
    p.add_argument("--verbose", action="store_true", help="also copy torchrun's INFO lines")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- torchrun command")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command")
    if args.chdir:
        os.chdir(args.chdir)
    if args.check_port is not None and _port_busy(args.check_port):
        print(format_event(host=args.label, port_busy=args.check_port), flush=True)
        return PORT_BUSY
    _subreaper()
    log_dir = tempfile.mkdtemp(prefix="gnnscale-agent-")
    try:
        sup = _Supervisor(args.label, _with_log_dir(cmd, log_dir), args.grace, args.verbose)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, f: sup.stop(signal.Signals(s).name))
        threading.Thread(target=_watch_stdin, args=(sup,), daemon=True).start()
        return sup.run()
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _with_log_dir(cmd: Sequence[str], log_dir: str) -> list[str]:
    """Insert ``--log-dir`` before torchrun's ``--no-python`` (where torchrun options end)."""
    cmd = list(cmd)
    if "--no-python" in cmd and "--log-dir" not in cmd:
        i = cmd.index("--no-python")
        cmd[i:i] = ["--log-dir", log_dir]
    return cmd


if __name__ == "__main__":
    sys.exit(main())
