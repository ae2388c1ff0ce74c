"""One untimed query to every node (as the app's device query), then `num-server-rounds` rounds of one
train message per node; each round's wall seconds, send to last reply, go to `timings-file` (JSON)."""

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _round(grid: Grid, nodes: list[int], message_type: str) -> tuple[float, int]:
    """(wall seconds, replies without error) of one message to each node."""
    started = time.monotonic()
    messages = [Message(RecordDict(), dst_node_id=node, message_type=message_type) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=600))
    return time.monotonic() - started, sum(not reply.has_error() for reply in replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds, min_nodes = int(context.run_config["num-server-rounds"]), int(context.run_config["min-nodes"])
    deadline = time.monotonic() + 300
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {min_nodes} nodes connected within 300 s")
        time.sleep(0.5)
    query_s, _ = _round(grid, nodes, "query")
    timed = [_round(grid, nodes, "train") for _ in range(rounds)]
    if timed and min(ok for _, ok in timed) < len(nodes):
        raise RuntimeError(f"some nodes did not answer: {[ok for _, ok in timed]} of {len(nodes)}")
    if out := str(context.run_config["timings-file"]):
        Path(out).write_text(json.dumps({"query_s": query_s, "seconds": [s for s, _ in timed],
                                         "replies": [ok for _, ok in timed], "nodes": len(nodes)}))
