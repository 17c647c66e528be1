"""Replies collected as soon as they arrive: Flower's HTTP grid checks for them every 3 s.

The ServerApp talks to the SuperLink over HTTP in simulation and in deployment alike, and Flower
1.42's `send_and_receive` sleeps 3 s between two pulls of the replies. Every exchange then waits
1.5 s on average, and up to 3 s, after its last reply is in, twice a round. `PromptlyPolledGrid`
pulls again after 20 ms, doubling the wait to at most 0.5 s: a reply is picked up within about
half a second of its arrival, while a round in which the sites train for minutes costs a pull every
half second, a light read of the SuperLink's state.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message

FIRST_WAIT_SECONDS = 0.02
LONGEST_WAIT_SECONDS = 0.5


def poll_waits() -> Iterator[float]:
    """The waits between two pulls: 20 ms, doubling, then 0.5 s from the sixth on."""
    wait = FIRST_WAIT_SECONDS
    while True:
        yield wait
        wait = min(2 * wait, LONGEST_WAIT_SECONDS)


class PromptlyPolledGrid:
    """The server's Flower grid, with `send_and_receive` pulling the replies on `poll_waits`.

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
        waits = poll_waits()
        while True:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            remaining = None if deadline is None else deadline - time.monotonic()
            if not pending or (remaining is not None and remaining <= 0):
                return replies
            wait = next(waits)
            time.sleep(wait if remaining is None else min(wait, remaining))
