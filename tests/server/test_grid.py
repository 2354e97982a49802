"""PromptGrid: Flower's send-and-receive semantics, looking for replies every POLL seconds instead of every 3 s."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from server.app import grid as grid_module
from server.app.grid import PromptGrid


class FakeGrid:
    """A grid whose replies arrive ``after`` seconds after the push (one per message id), or never."""

    def __init__(self, after: float | None) -> None:
        self.after, self.pulls, self.pushed_at = after, 0, 0.0

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Any) -> list[Any]:
        self.pulls += 1
        if self.after is None or time.monotonic() - self.pushed_at < self.after:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in message_ids]

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_replies_are_taken_as_they_arrive_and_the_rest_is_flowers_grid(monkeypatch: Any) -> None:
    monkeypatch.setattr(grid_module, "POLL", 0.05)
    fake = FakeGrid(after=0.3)
    started = time.monotonic()
    replies = PromptGrid(fake).send_and_receive(["a", "b"], timeout=10)  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.3 <= took < 1.5  # Flower's grid would have answered after 3 s
    assert PromptGrid(fake).get_node_ids() == [1, 2]  # type: ignore[arg-type]


def test_the_timeout_ends_the_wait_with_the_replies_in_so_far(monkeypatch: Any) -> None:
    monkeypatch.setattr(grid_module, "POLL", 0.05)
    fake = FakeGrid(after=None)
    started = time.monotonic()
    assert PromptGrid(fake).send_and_receive(["a"], timeout=0.3) == []  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - started < 1.0 and fake.pulls >= 3
