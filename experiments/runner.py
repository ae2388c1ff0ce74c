"""Running a grid: several runs at once (one process per worker, one PyTorch thread each), finished
runs skipped, interrupted ones resumed from their checkpoint, progress on one line per run."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.spec import Run, Spec

COMPLETED = "completed"
WHERE = ("output-dir", "data-dir", "resume")  # where a run's files are, not what it ran: a clone elsewhere reuses it


class StaleRun(RuntimeError):
    """A finished run in the output folder was made with another config than the spec asks for now."""


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "completed", "skipped" (already completed), "failed"
    seconds: float
    final_accuracy: float | None
    error: str | None = None


def run_status(run: Run) -> str | None:
    """The status in the run's results.json ("completed", "failed", "running"), None if it has none.

    Raises StaleRun when a completed run's config differs from the one the spec asks for, so a changed
    spec never silently reuses old results."""
    file = Path(run.config["output-dir"]) / run.name / "results.json"
    if not file.is_file():
        return None
    doc = json.loads(file.read_text())
    if doc.get("status") == COMPLETED:
        made = doc.get("config", {})
        changed = {k: (made.get(k.replace("-", "_")), v) for k, v in run.config.items()
                   if k not in WHERE and made.get(k.replace("-", "_"), v) != v}
        if changed:
            raise StaleRun(f"{file.parent} was made with other values {changed} (made, wanted): delete the "
                           "folder to rerun it, or give the spec another output-dir")
    return doc.get("status")


def execute(run: Run, nodes: int, log_dir: str) -> Outcome:
    """Run one grid point to its end in this process (a worker), resuming it if it has a checkpoint.

    Its console output goes to `<log_dir>/<name>.log`; the outcome comes back to the parent."""
    import torch

    torch.set_num_threads(1)  # one core per worker: runs in parallel, not threads fighting
    log = open(Path(log_dir) / f"{run.name}.log", "a")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    from experiments.inprocess import run_inprocess

    folder = Path(run.config["output-dir"]) / run.name
    config = dict(run.config)
    if (folder / "checkpoint.pt").is_file():
        config["resume"] = True  # continue after the last round it saved
    elif folder.exists():
        shutil.rmtree(folder)  # stopped before its first round: nothing to keep
    started = time.perf_counter()
    try:
        doc = run_inprocess(config, nodes)
    except BaseException as exc:  # one failed run must not stop the grid; its results.json says why
        return Outcome(run.name, "failed", time.perf_counter() - started, None, f"{type(exc).__name__}: {exc}")
    finally:
        log.flush()
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # tens of MB of resume state: not a result
    return Outcome(run.name, doc["status"], time.perf_counter() - started, doc["summary"].get("final_accuracy"),
                   doc.get("error"))


def run_grid(spec: Spec, workers: int | None = None, out=sys.stdout) -> list[Outcome]:
    """Run every run of `spec` not yet completed, `workers` at a time; one progress line per run."""
    spec.runs_dir.mkdir(parents=True, exist_ok=True)
    log_dir = spec.output_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    todo, outcomes = [], []
    for run in spec.runs:
        if run_status(run) == COMPLETED:
            outcomes.append(Outcome(run.name, "skipped", 0.0, None))
        else:
            todo.append(run)
    total, started = len(spec.runs), time.perf_counter()
    print(f"{spec.name}: {total} runs, {total - len(todo)} already completed, {len(todo)} to run with "
          f"{workers or spec.workers} workers; logs in {log_dir}", file=out, flush=True)
    if not todo:
        return outcomes
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no state shared between runs
    with context.Pool(workers or spec.workers, maxtasksperchild=1) as pool:
        pending = [pool.apply_async(execute, (run, spec.nodes, str(log_dir))) for run in todo]
        for done, result in enumerate(_as_completed(pending), start=1):
            outcomes.append(result)
            print(progress_line(result, total - len(todo) + done, total, time.perf_counter() - started, done,
                                len(todo)), file=out, flush=True)
    return outcomes


def _as_completed(pending: list) -> Any:
    while pending:
        for item in list(pending):
            if item.ready():
                pending.remove(item)
                yield item.get()
        time.sleep(0.5)


def progress_line(o: Outcome, finished: int, total: int, elapsed: float, done_now: int, todo: int) -> str:
    eta = elapsed / done_now * (todo - done_now)
    what = (f"final accuracy {o.final_accuracy:.4f}" if o.final_accuracy is not None else "no accuracy")
    if o.status != COMPLETED:
        what = f"{o.status.upper()}: {o.error}"
    return (f"[{finished}/{total}] {o.name}: {what} ({o.seconds:.0f} s)  elapsed {elapsed / 60:.1f} min, "
            f"about {eta / 60:.0f} min left")
