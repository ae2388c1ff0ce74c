"""An in-process federation: a Grid whose nodes are the real ClientApp, called directly.

It runs the ServerApp's round loop (`server_app.server_app.main`) against the ClientApp's
handlers without Ray or a SuperLink: the protocol, jobs, encodings, validation, byte counts
and results are exactly those of a `flwr run`, in one process. The experiments command and
the tests use it; the real engines are covered by the slow end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client_app.client_app import app as client_app
from server_app.server_app import main as server_main
from fl_app.results import load_results

class InProcessGrid(Grid):
    """Nodes 1..n; node i has partition-id i-1.

    Fault injection: `tamper` may rewrite any reply, or return None to drop it (the node
    missed the deadline); `node_config` adds node-config keys per node id (e.g. `fault`);
    `offline` node ids are not listed and their messages get Flower's node-unavailable
    error; `add_node` makes a node join (a restart comes back under a new id).
    """

    def __init__(self, run_config: dict, num_nodes: int,
                 tamper: Callable[[int, Message], Message | None] | None = None,
                 node_config: dict[int, dict] | None = None) -> None:
        self.run_config, self.num_nodes = dict(run_config), num_nodes
        self.contexts: dict[int, Context] = {}
        for n in range(1, num_nodes + 1):
            self.add_node(n, n - 1, **(node_config or {}).get(n, {}))
        self.tamper = tamper
        self.offline: set[int] = set()
        self.sent: list[Message] = []
        # Messages read their run and sender from the process's task identity.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def add_node(self, node_id: int, partition_id: int, **node_config) -> None:
        config = {"partition-id": partition_id, "num-partitions": self.num_nodes, **node_config}
        self.contexts[node_id] = Context(run_id=1, node_id=node_id, node_config=config, state=RecordDict(),
                                         run_config=dict(self.run_config))

    def set_run(self, run_id: int) -> None:  # part of the Grid interface; one run here
        pass

    @property
    def run(self):  # pragma: no cover - not used by the app
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grids do when pushing
            self.sent.append(msg)
            if node in self.offline:  # the SuperLink answers for an unavailable node, from its own id
                error = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(error)
                continue
            reply = client_app(msg, self.contexts[node])
            reply = self.tamper(node, reply) if self.tamper else reply
            if reply is not None:
                replies.append(reply)
        return replies


def run_inprocess(run_config: dict, num_nodes: int) -> dict:
    """Run the ServerApp to its end on `num_nodes` in-process nodes; the parsed results.json.

    Raises whatever the ServerApp raises (its results.json then says `failed` and why)."""
    grid = InProcessGrid(run_config, num_nodes)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))
    folder = Path(run_config.get("output-dir", "outputs")) / run_config["run-name"]
    return load_results(folder)
