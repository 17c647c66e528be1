"""The server collects each exchange's replies within 0.1 s of the last one arriving."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from pneumofed.server import polling
from pneumofed.server.polling import PULL_INTERVAL_SECONDS, PromptlyPolledGrid


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class DelayedRepliesGrid:
    """A Flower grid whose reply to each pushed message arrives at the given time (None: never)."""

    def __init__(self, clock: FakeClock, arrivals: list[float | None]) -> None:
        self.clock, self.arrivals, self.pulls = clock, arrivals, []

    def push_messages(self, messages):
        return [f"message-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls.append((self.clock.now, set(message_ids)))
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"message-{i}"))
                for i, arrival in enumerate(self.arrivals)
                if f"message-{i}" in message_ids and arrival is not None and arrival <= self.clock.now]

    def get_node_ids(self):
        return [1, 2, 3]


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(polling, "time", clock)
    return clock


@pytest.mark.parametrize("last_arrival", [0.0, 0.05, 1.0, 7.3, 60.0])
def test_every_reply_is_returned_once_within_a_tenth_of_a_second_of_the_last_arriving(clock, last_arrival):
    grid = DelayedRepliesGrid(clock, [0.0, last_arrival / 2, last_arrival])
    replies = PromptlyPolledGrid(grid).send_and_receive([object()] * 3)
    assert sorted(reply.metadata.reply_to_message_id for reply in replies) == ["message-0", "message-1", "message-2"]
    assert last_arrival <= clock.now <= last_arrival + PULL_INTERVAL_SECONDS + 1e-9
    # Only replies still missing are asked for.
    for (_, earlier), (_, later) in itertools.pairwise(grid.pulls):
        assert later <= earlier


def test_a_site_that_never_replies_ends_the_exchange_at_its_timeout_with_the_other_replies(clock):
    grid = DelayedRepliesGrid(clock, [0.3, None, 1.0])
    replies = PromptlyPolledGrid(grid).send_and_receive([object()] * 3, timeout=4.0)
    assert sorted(reply.metadata.reply_to_message_id for reply in replies) == ["message-0", "message-2"]
    assert clock.now == pytest.approx(4.0)
    assert grid.pulls[-1] == (pytest.approx(4.0), {"message-1"})


def test_everything_but_send_and_receive_is_the_grids_own(clock):
    assert PromptlyPolledGrid(DelayedRepliesGrid(clock, [])).get_node_ids() == [1, 2, 3]
