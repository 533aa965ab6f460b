"""Times as users write and read them: Unix seconds or ISO 8601, shown in UTC.

Kept apart from the snapshot code so that a command can check a --time or --timestamp
argument before it imports the repository's modules.
"""

from __future__ import annotations

import datetime as _dt

from kyrorepo.errors import UsageError


def iso_time(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> int:
    """Unix seconds or ISO 8601 (UTC when no offset) -> Unix seconds."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        dt = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"time {text!r} is neither Unix seconds nor ISO 8601 (e.g. 2025-10-20T14:30:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.timezone.utc)
    return int(dt.timestamp())
