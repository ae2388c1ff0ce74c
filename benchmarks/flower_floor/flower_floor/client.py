"""Answers every message at once: what is left of a round is Flower's (process start, runtime, polls)."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _reply(msg: Message) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _reply(msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg)
