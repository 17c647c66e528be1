"""A federation in one process: the real ServerApp round loop and ClientApp handlers, no Ray, no SuperLink.

Flower's simulation engine starts Ray and a local SuperLink (about 20 s) and runs every message in
a worker; for sweeps of many small arms that start-up costs more than the training. This grid hands
each message straight to the ClientApp handler that Flower would call for it, with one
`context.state` per node kept between messages as a SuperNode keeps it, so the arithmetic is
the same as in a Flower run (`tests/test_simulation.py` runs the same apps on Flower itself).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from pneumofed.client.app import answer_query
from pneumofed.client.app import app as client_app
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.rounds import run_federation

FIRST_NODE_ID = 100
log = logging.getLogger("pneumofed.simulations")


class ModRefusal(Exception):
    """A ClientApp mod answered with an error reply instead of calling the handler."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.reason)
        self.error = error


class InProcessGrid:
    """Delivers each message to the ClientApp handler of its node, in order; node ids from 100. Each
    node's node config names its site's store and, where run config `local-models` gives one, the
    local-only model it shares."""

    def __init__(self, sites: Sequence[Path], run_config: Mapping[str, Any]) -> None:
        self.run_config = dict(run_config)
        local_models = FederatedConfig.from_run_config(run_config).local_model_paths or [""] * len(sites)
        self.node_configs = {
            FIRST_NODE_ID + i: {"data-path": str(site), "site-name": Path(site).name} | ({"local-model": model} if model else {})
            for i, (site, model) in enumerate(zip(sites, local_models, strict=True))
        }
        # Each node's Flower context.state, as its SuperNode keeps it between messages.
        self.states = {node: RecordDict() for node in self.node_configs}

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def handle(self, message: Message) -> RecordDict:
        node = message.metadata.dst_node_id
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:
            return answer_query(message.content["config"], self.run_config, self.node_configs[node], self.states[node])
        if kind in (MessageType.TRAIN, MessageType.EVALUATE):
            # Through the ClientApp itself, as a SuperNode delivers it: its mods (secure aggregation,
            # site-level DP, the evaluation a TRAIN carries) act on these messages, and may change the copy
            # each node receives (SecAgg+ sends every node one content object).
            context = Context(run_id=0, node_id=node, node_config=self.node_configs[node], state=self.states[node],
                              run_config=self.run_config)
            delivered = copy.copy(message)
            delivered.content = copy.deepcopy(message.content)
            reply = client_app(delivered, context)
            if reply.has_error():  # a mod's refusal (e.g. Flower's clipping mod without its clipping norm)
                raise ModRefusal(reply.error)
            return reply.content
        raise ValueError(f"no ClientApp handler for message type {kind!r}")

    def reply(self, message: Message) -> Message:
        """The handler's reply, or, as a SuperNode sends it when its ClientApp raises, an error reply
        whose reason carries the exception (a site refusing an evaluation does this)."""
        try:
            return Message(self.handle(message), reply_to=message)
        except ModRefusal as refusal:  # a SuperNode sends a mod's error reply as it is
            log.info("node %s: a ClientApp mod refused: %s", message.metadata.dst_node_id, refusal.error.reason)
            return Message(refusal.error, reply_to=message)
        except Exception as error:  # Flower's run_clientapp catches every exception too
            refused = isinstance(error, PermissionError)  # the site's own policy, not a fault: no traceback
            log.log(logging.INFO if refused else logging.ERROR, "node %s: the ClientApp raised %r",
                    message.metadata.dst_node_id, error, exc_info=None if refused else error)
            reason = f"{type(error)}:<'{error}'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.reply(message) for message in messages]


@contextmanager
def task_identity(run_id: int = 0) -> Iterator[None]:
    """Flower builds a Message only inside a task (a SuperLink sets who is sending); play one here."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_in_process(sites: Sequence[Path], run_config: Mapping[str, Any]) -> tuple[RunDirectory, InProcessGrid]:
    """One federated run of `run_config` over the site stores `sites`: its run directory, and the grid
    with each node's final `context.state` (its site-local BatchNorm and optimiser state)."""
    config = FederatedConfig.from_run_config(run_config)
    grid = InProcessGrid(sites, run_config)
    with task_identity(), RunDirectory.open(config, flower_run_id=0) as run:
        run_federation(grid, config, run)
    return run, grid
