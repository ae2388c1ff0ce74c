"""An in-process federation: a Grid whose nodes are the real ClientApp, called directly.

It runs the ServerApp's round loop against the ClientApp's handlers without Ray or a
SuperLink, so the protocol (jobs, encodings, validation, results) is tested in
seconds. The real engines are covered by the slow end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client_app.client_app import app as client_app

class InProcessGrid(Grid):
    """Nodes 1..n; node i has partition-id i-1. `tamper` may rewrite any reply (fault injection)."""

    def __init__(self, run_config: dict, num_nodes: int,
                 tamper: Callable[[int, Message], Message] | None = None) -> None:
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": num_nodes},
                       state=RecordDict(), run_config=dict(run_config))
            for n in range(1, num_nodes + 1)}
        self.tamper = tamper
        self.sent: list[Message] = []
        # Messages read their run and sender from the process's task identity.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def set_run(self, run_id: int) -> None:  # part of the Grid interface; one run here
        pass

    @property
    def run(self):  # pragma: no cover - not used by the app
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            reply = client_app(msg, self.contexts[node])
            replies.append(self.tamper(node, reply) if self.tamper else reply)
        return replies
