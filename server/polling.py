"""Replies collected as soon as they arrive: Flower's HTTP grid checks for them every 3 s.

A deployed ServerApp talks to the SuperLink over HTTP, and Flower 1.42's `HttpGrid.send_and_receive`
sleeps 3 s between two pulls of the replies, so every exchange waits 1.5 s on average (up to 3 s)
after its last reply is in, twice a round. In simulation the ServerApp gets Flower's in-memory grid,
which pulls every 0.1 s. `PromptlyPolledGrid` pulls every 0.1 s on either: a pull is a light read of
the SuperLink's state, ten a second while the sites train.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message

PULL_INTERVAL_SECONDS = 0.1  # Flower's in-memory grid's


class PromptlyPolledGrid:
    """The server's Flower grid, with `send_and_receive` pulling the replies every 0.1 s.

    As Flower's own: the messages are pushed, then their replies pulled until every one is in or
    `timeout` seconds (None: no limit) have passed, and the replies in by then are returned.
    """

    def __init__(self, grid) -> None:  # a Flower Grid: push_messages, pull_messages, ...
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)  # node ids, run, push and pull: the grid's own

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            remaining = None if deadline is None else deadline - time.monotonic()
            if not pending or (remaining is not None and remaining <= 0):
                return replies
            time.sleep(PULL_INTERVAL_SECONDS if remaining is None else min(PULL_INTERVAL_SECONDS, remaining))
