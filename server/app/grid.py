"""The ServerApp's grid, taking each reply as it arrives rather than on Flower's 3-second tick.

Flower 1.41's deployment grid (``flwr/superlink/grid/http_grid.py``) pushes a round's
messages, then looks for the replies every 3 s: every message round trip ends on a
3-second boundary, and a SecAgg+ round has five of them per site. :class:`PromptGrid`
keeps Flower's grid and its semantics (push, then pull until every reply is in or the
timeout has passed) and only looks every :data:`POLL` seconds, one loopback call each.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp import Grid

POLL = 0.2  # s between looks for replies


class PromptGrid:
    """``grid`` with a :meth:`send_and_receive` that looks for replies every :data:`POLL` s; the rest is ``grid``'s."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``; their replies, as Flower's ``Grid.send_and_receive`` returns them."""
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while end is None or time.time() < end:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            time.sleep(POLL if end is None else max(0.0, min(POLL, end - time.time())))
        return replies
