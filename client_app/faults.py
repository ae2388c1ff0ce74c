"""Fault injection: a node that misbehaves on purpose, to test how a federation copes.

Set node-config `fault` on a SuperNode (never needed in normal use):

    fault = "nan"          every train reply carries NaN weights / logits
    fault = "shapes"       ... tensors of the wrong shape
    fault = "oversize"     ... an extra 64 MB array
    fault = "dtype"        ... integer tensors where floats belong
    fault = "examples"     ... a report claiming 1000x the examples the node holds
    fault = "hang:SECONDS" sleep that long before replying (a straggler)
    fault = "nan@2,3"      only in rounds 2 and 3 (any kind takes @rounds)
    fault = "nan@1;shapes@2"  several, separated by ';' (the first that applies to a round wins)

The reply is built honestly first and then damaged, so the server sees exactly what a
buggy or hostile client could send.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

KINDS = ("nan", "shapes", "oversize", "dtype", "examples", "hang")


class FaultConfigError(ValueError):
    """A `fault` node-config value that is not one of the documented forms."""


@dataclass(frozen=True)
class Fault:
    kind: str
    seconds: float = 0.0
    rounds: frozenset[int] | None = None  # None: every round

    @classmethod
    def parse(cls, text: str) -> Fault:
        spec, _, rounds = text.partition("@")
        kind, _, arg = spec.partition(":")
        try:
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            if (kind == "hang") != bool(arg):
                raise ValueError("hang takes seconds (hang:30); other kinds take none")
            seconds = float(arg) if arg else 0.0
            if seconds < 0:
                raise ValueError("seconds must be >= 0")
            which = frozenset(int(r) for r in rounds.split(",")) if rounds else None
        except ValueError as exc:
            raise FaultConfigError(f"node config fault = {text!r}: {exc}; valid: {', '.join(KINDS[:-1])}, "
                                   "hang:SECONDS, each optionally @ROUND[,ROUND...]") from exc
        return cls(kind, seconds, which)

    @staticmethod
    def parse_all(text: str) -> list[Fault]:
        return [Fault.parse(part.strip()) for part in text.split(";") if part.strip()]

    def applies(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    def damage(self, content: RecordDict, record: str) -> RecordDict:
        """The reply as this fault sends it (after sleeping, for a hang)."""
        if self.kind == "hang":
            time.sleep(self.seconds)
            return content
        if self.kind == "examples":
            report = dict(content["report"])
            report["num-examples"] = int(report["num-examples"]) * 1000
            content["report"] = MetricRecord(report)
            return content
        arrays = {name: array.numpy() for name, array in content[record].items()}
        if self.kind == "oversize":
            arrays["padding"] = np.zeros(16 * 2**20, dtype=np.float32)
        for name, a in list(arrays.items()):
            if self.kind == "nan" and np.issubdtype(a.dtype, np.floating):
                arrays[name] = np.full_like(a, np.nan)
            elif self.kind == "shapes":
                arrays[name] = np.zeros((a.size + 1,), dtype=a.dtype)
            elif self.kind == "dtype" and np.issubdtype(a.dtype, np.floating):
                arrays[name] = a.astype(np.int32)
        content[record] = ArrayRecord({name: Array(a) for name, a in arrays.items()})
        return content


def fault_for_round(faults: Iterable[Fault], server_round: int) -> Fault | None:
    return next((f for f in faults if f.applies(server_round)), None)
