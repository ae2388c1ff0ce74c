"""Run results: one JSON document and a per-round CSV, rewritten atomically after every round.

A crash at any moment leaves the last complete version on disk (write to a temporary
file, then rename over the old one), so finished rounds are never lost.

Schema of `results.json` (documented in the README):
    {"status": "running" | "completed" | "failed", "error": str | null,
     "stopped_before_training": true (only when the run stopped before its first round),
     "config": {...run config...},
     "devices": [{"node_id", "partition_id", "profile", "gflops", "memory_mb",
                  "uplink_mbps", "downlink_mbps"}],
     "rounds": [{"round", "accuracy", "loss", "bytes_down", "bytes_up", "seconds",
                 "participants", "clients": [{...per client...}], ...strategy extras}],
     "summary": {...}}
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

CSV_COLUMNS = ("round", "accuracy", "loss", "bytes_down", "bytes_up", "participants", "failed",
               "device_time_s_max", "seconds")


class ResultsWriter:
    """The results of one run; `doc` (the checkpoint's copy) continues a resumed run where it stopped."""

    def __init__(self, folder: Path, config: dict[str, Any], devices: list[dict[str, Any]],
                 doc: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.doc: dict[str, Any] = doc or {"status": "running", "error": None, "config": config,
                                           "devices": devices, "rounds": [], "summary": {}}
        if doc:  # resumed: the checkpoint's rounds, then this run's; devices seen by either
            self.doc.update(status="running", error=None, config=config)
            self.set_devices(devices)
        folder.mkdir(parents=True, exist_ok=True)
        self.write()

    @classmethod
    def stopped_before_training(cls, folder: Path, config: dict[str, Any], devices: list[dict[str, Any]],
                                error: str) -> ResultsWriter:
        """The results of a run that stopped before its first round: status "failed", the error, the
        config and the devices known by then. Marked `stopped_before_training`, so that a corrected
        run may reuse the run-name (the folder holds no results of a run)."""
        writer = cls(folder, config, devices)
        writer.doc["stopped_before_training"] = True
        writer.finish(error=error)
        return writer

    def set_devices(self, devices: list[dict[str, Any]]) -> None:
        """Record devices (a node that joined mid-run is added; one that left stays listed)."""
        known = {d["node_id"] for d in self.doc["devices"]}
        self.doc["devices"] += [d for d in devices if d["node_id"] not in known]

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.doc["rounds"]

    def add_round(self, record: dict[str, Any], write: bool = True) -> None:
        self.rounds.append(record)
        self.doc["summary"] = summarize(self.rounds)
        if write:
            self.write()

    def finish(self, error: str | None = None) -> None:
        self.doc["status"] = "failed" if error else "completed"
        self.doc["error"] = error
        self.write()

    def write(self) -> None:
        atomic_write_bytes(self.folder / "results.json", json.dumps(_finite(self.doc), indent=1).encode())
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in self.rounds:
            writer.writerow(_csv_row(r))
        atomic_write_bytes(self.folder / "rounds.csv", buf.getvalue().encode())


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    clients = r.get("clients", [])
    return {**r, "failed": sum(1 for c in clients if c.get("error")),
            "device_time_s_max": max((c.get("device_time_s") or 0 for c in clients), default=0)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    if not rounds:
        return {}
    accs = [r["accuracy"] for r in rounds]  # None: a round with nothing to score (no accuracy, not 0.0)
    clients = [c for r in rounds for c in r["clients"]]
    return {
        "rounds_completed": len(rounds),
        "final_accuracy": accs[-1],
        "best_accuracy": max((a for a in accs if a is not None), default=None),
        "total_bytes_down": sum(r["bytes_down"] for r in rounds),
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        # Clients of a round run in parallel: the round takes as long as its slowest client.
        "total_device_time_s": sum(max((c.get("device_time_s") or 0 for c in r["clients"]), default=0)
                                   for r in rounds),
        "client_failures": sum(1 for c in clients if c.get("error")),
        "missed_deadline": sum(r.get("missed_deadline", 0) for r in rounds),
        "rejected_replies": sum(r.get("rejected", 0) for r in rounds),
        "retried_rounds": sum(1 for r in rounds if r.get("attempts", 1) > 1),
        "distinct_participants": len({c["node_id"] for c in clients if c.get("participated")}),
    }


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash at any moment leaves either the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
