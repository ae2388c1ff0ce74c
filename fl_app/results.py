"""Run results: one JSON document and a per-round CSV, rewritten atomically after every round.

A crash at any moment leaves the last complete version on disk (write to a temporary
file, then rename over the old one), so finished rounds are never lost.

Schema of `results.json` (documented in the README):
    {"status": "running" | "completed" | "failed", "error": str | null,
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
    def __init__(self, folder: Path, config: dict[str, Any], devices: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.doc: dict[str, Any] = {"status": "running", "error": None, "config": config,
                                    "devices": devices, "rounds": [], "summary": {}}
        folder.mkdir(parents=True, exist_ok=True)
        self._write()

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.doc["rounds"]

    def add_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        self.doc["summary"] = summarize(self.rounds)
        self._write()

    def finish(self, error: str | None = None) -> None:
        self.doc["status"] = "failed" if error else "completed"
        self.doc["error"] = error
        self._write()

    def _write(self) -> None:
        _atomic_write(self.folder / "results.json", json.dumps(_finite(self.doc), indent=1))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in self.rounds:
            writer.writerow(_csv_row(r))
        _atomic_write(self.folder / "rounds.csv", buf.getvalue())


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    clients = r.get("clients", [])
    return {**r, "failed": sum(1 for c in clients if c.get("error")),
            "device_time_s_max": max((c.get("device_time_s") or 0 for c in clients), default=0)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    if not rounds:
        return {}
    accs = [r["accuracy"] for r in rounds]
    clients = [c for r in rounds for c in r["clients"]]
    return {
        "rounds_completed": len(rounds),
        "final_accuracy": accs[-1],
        "best_accuracy": max(accs),
        "total_bytes_down": sum(r["bytes_down"] for r in rounds),
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        # Clients of a round run in parallel: the round takes as long as its slowest client.
        "total_device_time_s": sum(max((c.get("device_time_s") or 0 for c in r["clients"]), default=0)
                                   for r in rounds),
        "client_failures": sum(1 for c in clients if c.get("error")),
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


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
