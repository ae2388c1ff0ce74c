"""Run results: a small results.json, the rounds and devices as JSON Lines, and a per-round CSV.

Files in a run folder, written after every round:

    results.json   status, error, config, summary, resumed; rewritten atomically. Its size does not grow
                   with rounds or nodes, so it stays readable at any scale.
    rounds.jsonl   one JSON object per round, its clients inside; appended (each line flushed to disk).
    devices.jsonl  one JSON object per device, appended as nodes are admitted.
    rounds.csv     the key figures, one line per round.

A crash at any moment leaves every finished round on disk: results.json is replaced atomically
(write to a temporary file, then rename), and a line of a .jsonl file that was cut short by a
crash is ignored by `load_results` (a resumed run rewrites both files from its checkpoint).
`load_results(folder)` returns the whole run as one dict, also for results written before the
.jsonl files existed (rounds and devices inside results.json).

Schema of the whole run (documented in the README):
    {"status": "running" | "completed" | "failed", "error": str | null,
     "stopped_before_training": true (only when the run stopped before its first round),
     "config": {...run config...},
     "devices": [{"node_id", "partition_id", "profile", "gflops", "memory_mb",
                  "uplink_mbps", "downlink_mbps", "num_examples"}],
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
               "device_time_s_max", "emulated_round_s", "emulated_clock_s", "seconds")
LISTS = {"rounds": "rounds.jsonl", "devices": "devices.jsonl"}  # kept out of results.json, one line each


RUN_FILES = ("results.json", *LISTS.values(), "rounds.csv")  # what ResultsWriter writes in a run folder


class ResultsError(ValueError):
    """A run folder whose results cannot be read; the message names the file and what is wrong."""


class OutputWriteError(OSError):
    """A run folder that cannot be written (read-only, full, missing permissions); the message names
    the folder or file, the system's reason and what to do."""


def check_writable(folder: Path) -> None:
    """Create `folder` and write, flush and remove a file in it, so that an output-dir that cannot
    hold results is refused before any training; OutputWriteError saying why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"fl-app")
                f.flush()
                os.fsync(f.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot write the run folder {folder} ({exc.strerror or exc}): choose a writable "
                               "output-dir (a read-only mount, a full disk or missing permissions stop here, "
                               "before any training)") from None


def remove_stale_temporaries(folder: Path, names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """Remove the temporary files `atomic_write_bytes` leaves beside `names` when its process is killed
    mid-write (`.<name>.<random>`), and the write probe's; the removed paths. Call it only while no
    other process writes the folder (a run owns its folder)."""
    removed = []
    for name in (*names, ".write-probe"):
        for tmp in folder.glob(f".{name.lstrip('.')}.*") if folder.is_dir() else []:
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass  # gone meanwhile, or not ours to remove: it is ignored by every reader anyway
    return removed


def holds_no_round(folder: Path, checkpoint: str) -> bool:
    """True when `folder` has results.json but neither a completed round nor the file `checkpoint`:
    a run that stopped before or during its first round (e.g. its first checkpoint could not be
    written), which a new run or `resume = true` may start afresh."""
    if (folder / checkpoint).exists():
        return False
    try:
        return load_results(folder).get("rounds") == []
    except ResultsError:
        return False


def load_results(folder: Path | str) -> dict[str, Any]:
    """The whole results of the run in `folder` (results.json with its rounds and devices); ResultsError
    if results.json is missing or not JSON. A .jsonl line cut short by a crash is left out."""
    folder = Path(folder)
    path = folder / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ResultsError(f"{path}: cannot read the run's results ({exc})") from None
    if not isinstance(doc, dict):
        raise ResultsError(f"{path}: not a results file of this app (expected a JSON object)")
    for key, name in LISTS.items():
        if doc.get(f"{key}_file") == name:
            doc[key] = read_jsonl(folder / name)
    return doc


def read_jsonl(path: Path) -> list[Any]:
    """Every complete line of a JSON Lines file (none if it does not exist); a last line without its
    newline was cut short by a crash and is left out. ResultsError for a malformed complete line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the part after the last newline is incomplete (or empty)
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except ValueError as exc:
        raise ResultsError(f"{path}: a line is not valid JSON ({exc})") from None


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
        self._on_disk = {key: None for key in LISTS}  # lines known to be in each .jsonl (None: rewrite it)
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

    def discard_last_round(self) -> None:
        """Forget the last round added (before it was written): one whose checkpoint could not be
        written, so that the results never show a round a resumed run would lack."""
        self.rounds.pop()
        self.doc["summary"] = summarize(self.rounds)

    def finish(self, error: str | None = None) -> None:
        self.doc["status"] = "failed" if error else "completed"
        self.doc["error"] = error
        self.write()

    def write(self) -> None:
        """Append what is new to rounds.jsonl and devices.jsonl, then replace results.json and rounds.csv."""
        for key, name in LISTS.items():
            items, done = self.doc[key], self._on_disk[key]
            if done is None or done > len(items):  # a new or resumed writer: the file from its own records
                atomic_write_bytes(self.folder / name, b"".join(_json_line(x) for x in items))
            elif done < len(items):
                append_lines(self.folder / name, [_json_line(x) for x in items[done:]])
            self._on_disk[key] = len(items)
        small = {k: v for k, v in self.doc.items() if k not in LISTS}
        small.update({f"{key}_file": name for key, name in LISTS.items()})
        atomic_write_bytes(self.folder / "results.json", json.dumps(_finite(small), indent=1).encode())
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in self.rounds:
            writer.writerow(_csv_row(r))
        atomic_write_bytes(self.folder / "rounds.csv", buf.getvalue().encode())


def _json_line(item: Any) -> bytes:
    return (json.dumps(_finite(item), separators=(",", ":")) + "\n").encode()


def append_lines(path: Path, lines: list[bytes]) -> None:
    """Append whole lines and flush them to disk; a crash mid-append leaves at most one cut line."""
    with open(path, "ab") as f:
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())


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
        # The virtual clock (server_app.clock): clients of a round run in parallel, the round lasts until
        # its slowest included reply or its emulated deadline.
        "emulated_time_s": rounds[-1].get("emulated_clock_s", 0.0),
        "client_failures": sum(1 for c in clients if c.get("error")),
        "missed_deadline": sum(r.get("missed_deadline", 0) for r in rounds),
        "dropped_out": sum(r.get("dropped_out", 0) for r in rounds),
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


def atomic_write_bytes(path: Path, data: bytes, suffix: str = "") -> None:
    """Replace `path` with `data` so that a crash at any moment leaves either the old or the new file
    (and at most a temporary `.<name>.*<suffix>` beside it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
