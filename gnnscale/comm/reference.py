"""Pure-Python executor of the 2D allreduce schedule: one step at a time, each a point-to-point
send to the right ring neighbour and a receive from the left one on the ring's process group.

The oracle for the native executor and the fallback when the extension is not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .schedule import Step

__all__ = ["run_schedule"]


def run_schedule(buf: torch.Tensor, steps: Sequence[Step], groups: Sequence[Any | None],
                 tag: int = 0) -> None:
    """Run ``steps`` on the 1-D contiguous ``buf`` in place.

    Args:
        buf: this rank's padded flat buffer.
        steps: from :func:`gnnscale.comm.schedule.schedule`.
        groups: the SERVER/AXIS0/AXIS1 process groups (``ProcessGroup`` or c10d ``Backend``);
            entries of one-member rings are never used and may be None.
        tag: point-to-point tag, so concurrent schedules on the same groups do not mix.
    """
    tmp: torch.Tensor | None = None
    for st in steps:
        pg = groups[st.ring]
        assert pg is not None, f"step on ring {st.ring} without a process group"
        out = buf[st.send_off:st.send_off + st.length]
        dst = buf[st.recv_off:st.recv_off + st.length]
        if st.reduce:
            if tmp is None or tmp.numel() < st.length:
                tmp = torch.empty(st.length, dtype=buf.dtype, device=buf.device)
            into = tmp[:st.length]
        else:
            into = dst
        if st.send_first:
            send = pg.send([out], st.send_to, tag)
            recv = pg.recv([into], st.recv_from, tag)
        else:
            recv = pg.recv([into], st.recv_from, tag)
            send = pg.send([out], st.send_to, tag)
        recv.wait()
        send.wait()
        if st.reduce:
            dst.add_(into)
