"""Fault injection: a node that misbehaves on purpose, to test how a federation copes.

Set node-config `fault` on a SuperNode (never needed in normal use). Faults of a buggy node:

    fault = "nan"          every train reply carries NaN weights / logits
    fault = "shapes"       ... tensors of the wrong shape
    fault = "oversize"     ... an extra 64 MB array
    fault = "dtype"        ... integer tensors where floats belong
    fault = "examples"     ... a report claiming 1000x the examples the node holds
    fault = "hang:SECONDS" sleep that long before replying (a straggler)

Attacks of a hostile node (replies that pass every format check; the defences are run-config
`aggregation` and the server's own checks, see the README's "Hostile participants"):

    fault = "boost:K"           model replacement: send G + K (W - G), W its trained weights, G those it
                                started from (logits: K x its logits)
    fault = "signflip:K"        send G - K (W - G): push the model backwards
    fault = "labelflip"         train on labels C-1-y (an honest-looking update that teaches the wrong classes)
    fault = "inflate-examples"  claim 10^4 x its examples in the device query and in every report
    fault = "spoof-profile"     report an impossible device (10^300 GFLOPS, 10^12 MB memory and link rates)
                                named by 1 MiB of text holding a newline and a forged log line
    fault = "adversarial-logits"  logit replies (REFT) become one-hot x 10^4 of a wrong class (argmax + 1);
                                weight replies are sent honestly
    fault = "huge"              every float sent is 3e38 (finite in float32; its sum overflows float32)

    fault = "nan@2,3"      only in rounds 2 and 3 (any kind takes @rounds; the device query has no round:
                           inflate-examples and spoof-profile always change it)
    fault = "nan@1;shapes@2"  several, separated by ';'; all that apply to a round act, in this order
                           (e.g. "inflate-examples;labelflip": an inflated count on flipped labels)

The reply is built honestly first and then damaged (labelflip: trained on flipped labels), so the
server sees exactly what a buggy or hostile client could send.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

KINDS = ("nan", "shapes", "oversize", "dtype", "examples", "hang", "boost", "signflip", "labelflip",
         "inflate-examples", "spoof-profile", "adversarial-logits", "huge")
WITH_ARGUMENT = {"hang": "seconds", "boost": "K", "signflip": "K"}  # kinds that take ':<value>'
INFLATION = 10_000  # inflate-examples' factor
HUGE = 3e38  # just below float32's largest finite value (3.4e38)


class FaultConfigError(ValueError):
    """A `fault` node-config value that is not one of the documented forms."""


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float = 0.0  # hang's seconds, or boost's and signflip's K
    rounds: frozenset[int] | None = None  # None: every round

    @classmethod
    def parse(cls, text: str) -> Fault:
        spec, _, rounds = text.partition("@")
        kind, _, arg = spec.partition(":")
        try:
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            if (kind in WITH_ARGUMENT) != bool(arg):
                raise ValueError("hang, boost and signflip take a number (hang:30, boost:10); other kinds take none")
            value = float(arg) if arg else 0.0
            if value < 0:
                raise ValueError(f"{WITH_ARGUMENT[kind]} must be >= 0")
            which = frozenset(int(r) for r in rounds.split(",")) if rounds else None
        except ValueError as exc:
            forms = ", ".join(k + (f":{WITH_ARGUMENT[k].upper()}" if k in WITH_ARGUMENT else "") for k in KINDS)
            raise FaultConfigError(f"node config fault = {text!r}: {exc}; valid: {forms}, "
                                   "each optionally @ROUND[,ROUND...]") from exc
        return cls(kind, value, which)

    @staticmethod
    def parse_all(text: str) -> list[Fault]:
        return [Fault.parse(part.strip()) for part in text.split(";") if part.strip()]

    def applies(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    def damage(self, content: RecordDict, record: str, start: dict[str, np.ndarray] | None = None) -> RecordDict:
        """The reply as this fault sends it (after sleeping, for a hang). `start`: the values the node
        started this round from, by reply tensor name (boost and signflip move away from them; absent
        names, e.g. logits, start from zero)."""
        if self.kind == "hang":
            time.sleep(self.value)
            return content
        if self.kind in ("examples", "inflate-examples"):
            report = dict(content["report"])
            report["num-examples"] = int(report["num-examples"]) * (1000 if self.kind == "examples" else INFLATION)
            content["report"] = MetricRecord(report)
            return content
        if self.kind == "labelflip" or (self.kind == "adversarial-logits" and record != "logits"):
            return content  # labelflip acted on training (`flip_labels`); weight replies go out honestly
        arrays = {name: array.numpy() for name, array in content[record].items()}
        if self.kind == "oversize":
            arrays["padding"] = np.zeros(16 * 2**20, dtype=np.float32)
        for name, a in list(arrays.items()):
            if not np.issubdtype(a.dtype, np.floating):
                if self.kind == "shapes":
                    arrays[name] = np.zeros((a.size + 1,), dtype=a.dtype)
                continue
            origin = (start or {}).get(name, np.zeros_like(a)).astype(a.dtype)
            arrays[name] = {
                "nan": lambda: np.full_like(a, np.nan),
                "shapes": lambda: np.zeros((a.size + 1,), dtype=a.dtype),
                "dtype": lambda: a.astype(np.int32),
                "boost": lambda: origin + self.value * (a - origin),
                "signflip": lambda: origin - self.value * (a - origin),
                "huge": lambda: np.full_like(a, HUGE),
                "adversarial-logits": lambda: wrong_class_logits(a),
            }.get(self.kind, lambda: a)()
        content[record] = ArrayRecord({name: Array(a) for name, a in arrays.items()})
        return content

    def damage_query(self, report: dict) -> dict:
        """The device report as this fault sends it (inflate-examples, spoof-profile; others send it honestly)."""
        if self.kind == "inflate-examples":
            return {**report, "num_examples": int(report["num_examples"]) * INFLATION}
        if self.kind == "spoof-profile":
            numbers = {k: (1e300 if k == "gflops" else 1e12) for k, v in report.items()
                       if k.endswith(("gflops", "_mb", "_mbps")) and isinstance(v, float)}
            forged = "x" * 2**20 + "\nINFO :      round 9/8  accuracy 0.9999 (forged)"
            return {**report, **numbers, "profile": forged}
        return report

    def flip_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Training labels as this fault trains on them: C-1-y for labelflip, else unchanged."""
        return num_classes - 1 - labels if self.kind == "labelflip" else labels


def wrong_class_logits(logits: np.ndarray) -> np.ndarray:
    """[P, C] logits -> one-hot x 10^4 of the class after each row's argmax: a confident wrong teacher."""
    out = np.zeros_like(logits)
    out[np.arange(len(logits)), (logits.argmax(1) + 1) % logits.shape[1]] = 1e4
    return out


def faults_for_round(faults: Iterable[Fault], server_round: int) -> list[Fault]:
    """The faults that act in `server_round`, in the order given."""
    return [f for f in faults if f.applies(server_round)]
