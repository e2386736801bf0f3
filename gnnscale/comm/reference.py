"""Pure-Python executor of the 2D allreduce schedule: one step at a time, each a point-to-point
send to the right ring neighbour and a receive from the left one on the ring's process group.

The oracle for the native executor and the fallback when the extension is not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from .schedule import Step

__all__ = ["run_schedule"]


def run_schedule(buf: torch.Tensor, steps: Sequence[Step], groups: Sequence[Any | None],
                 segments: int = 1, timeout: timedelta | None = None) -> None:
    """Run ``steps`` on each of ``segments`` equal parts of the 1-D contiguous ``buf``, in place.

    Args:
        buf: this rank's padded flat buffer (``segments`` divides its length).
        steps: one segment's steps, from :func:`gnnscale.comm.schedule.schedule`.
        groups: the SERVER/AXIS0/AXIS1 process groups (``ProcessGroup`` or c10d ``Backend``);
            entries of one-member rings are never used and may be None.
        segments: how many parts; segment k's messages carry tag k.
        timeout: bound on each wait (None: the group's own timeout).

    Steps run in (step, segment) order, the order in which the native executor posts them, so
    on gloo a rank running this can talk to a rank running the native executor.
    """
    seg_len = buf.numel() // segments
    tmp: torch.Tensor | None = None
    for st in steps:
        pg = groups[st.ring]
        assert pg is not None, f"step on ring {st.ring} without a process group"
        if st.reduce and (tmp is None or tmp.numel() < st.length):
            tmp = torch.empty(st.length, dtype=buf.dtype, device=buf.device)
        for k in range(segments):
            base = k * seg_len
            out = buf[base + st.send_off:base + st.send_off + st.length]
            dst = buf[base + st.recv_off:base + st.recv_off + st.length]
            into = tmp[:st.length] if st.reduce and tmp is not None else dst
            if st.send_first:
                send = pg.send([out], st.send_to, k)
                recv = pg.recv([into], st.recv_from, k)
            else:
                recv = pg.recv([into], st.recv_from, k)
                send = pg.send([out], st.send_to, k)
            if timeout is None:
                recv.wait()
                send.wait()
            else:
                recv.wait(timeout)
                send.wait(timeout)
            if st.reduce:
                dst.add_(into)
