"""The line protocol between a host's agent supervisor and the launcher: ordinary output is
copied, lines ``@gnnscale KEY=VALUE ...`` on stdout carry state changes and failures."""

from __future__ import annotations

__all__ = ["EVENT_MARK", "PORT_BUSY", "format_event", "parse_event"]

EVENT_MARK = "@gnnscale "
#: exit status of the supervisor when its ``--check-port`` is taken
PORT_BUSY = 3


def format_event(**fields: object) -> str:
    """One event line (values must not contain spaces)."""
    return EVENT_MARK + " ".join(f"{k}={v}" for k, v in fields.items())


def parse_event(line: str) -> dict[str, str] | None:
    """The fields of an event line, or None for ordinary output."""
    if not line.startswith(EVENT_MARK):
        return None
    return dict(kv.split("=", 1) for kv in line[len(EVENT_MARK):].split() if "=" in kv)
