"""Running a grid as Ray tasks: one task per run (a fresh worker process, one PyTorch thread, a
fraction of a GPU when asked), finished runs skipped, interrupted ones resumed from their checkpoint,
progress over the grid on one line per finished run.

Ray is embedded by default: a local instance with one CPU per worker and a small object store (runs
exchange only a few-line `Outcome`), started for the grid and stopped after it. `address` joins an
existing cluster instead (`ray start --head` on one machine, `ray start --address HEAD:PORT` on the
others); its tasks then take whatever CPUs and GPUs it has. Every run writes its own results.json and
log where the spec says, so on a cluster of several machines the repository, `output-dir` and
`data-dir` must be at the same paths on every machine (a shared filesystem); a run whose
results.json is not where the spec says is reported failed, naming the machine that ran it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from experiments.spec import Run, Spec

COMPLETED = "completed"
WHERE = ("output-dir", "data-dir", "resume")  # where a run's files are, not what it ran: a clone elsewhere reuses it
REPO = Path(__file__).resolve().parent.parent  # on a Ray worker's PYTHONPATH: it runs this checkout's code
OBJECT_STORE_BYTES = 100 * 2**20  # embedded Ray's shared-memory store (Ray's minimum is 75 MiB): runs return a
# small Outcome each, so the default (30 % of RAM) would only take memory from the runs
ACCEL_OVERRIDE = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"  # Ray hides the GPUs from a task holding none unless "0"


class StaleRun(RuntimeError):
    """A finished run in the output folder was made with another config than the spec asks for now."""


class GridError(RuntimeError):
    """The grid cannot be scheduled as asked (no GPU for --gpus-per-run, no cluster at --address)."""


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "completed", "skipped" (already completed), "failed"
    seconds: float
    final_accuracy: float | None
    error: str | None = None
    host: str = ""  # the machine that ran it


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
    """Run one grid point to its end in this process (a Ray worker of its own), resuming it if it has
    a checkpoint. Its console output goes to `<log_dir>/<name>.log`; the outcome comes back to the driver."""
    import torch

    torch.set_num_threads(1)  # one core per run: runs in parallel, not threads fighting
    host = socket.gethostname()
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
        return Outcome(run.name, "failed", time.perf_counter() - started, None, f"{type(exc).__name__}: {exc}", host)
    finally:
        log.flush()
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # tens of MB of resume state: not a result
    return Outcome(run.name, doc["status"], time.perf_counter() - started, doc["summary"].get("final_accuracy"),
                   doc.get("error"), host)


def run_grid(spec: Spec, workers: int | None = None, out: TextIO = sys.stdout, address: str | None = None,
             gpus_per_run: float | None = None) -> list[Outcome]:
    """Run every run of `spec` not yet completed as Ray tasks; one progress line per finished run.

    - `workers`: runs at once (default: the spec's `workers` on the embedded Ray, as many as the
      cluster's CPUs, or GPUs / `gpus_per_run`, hold at `address`);
    - `address`: an existing Ray cluster (host:port of its head) instead of the embedded one;
    - `gpus_per_run`: the fraction of a GPU each run holds, in (0, 1]; None: no GPU is reserved (a run
      still trains on CUDA where the machine has it, as before Ray, sharing it unaccounted).

    Raises GridError (one line) before any run starts when the grid cannot be scheduled as asked."""
    check_cluster_request(address, gpus_per_run)
    where = f"on the Ray cluster at {address}" if address else "on an embedded Ray"
    log_dir, todo, outcomes = _prepare(spec, where, out)
    if not todo:
        return outcomes
    with ray_cluster(address, workers or spec.workers, gpus_per_run) as cluster_slots:
        slots = min(workers, cluster_slots) if (workers and address) else cluster_slots
        for outcome in _schedule(todo, spec.nodes, str(log_dir), slots, gpus_per_run, len(outcomes), out):
            outcomes.append(outcome)
    return outcomes


def run_sequentially(spec: Spec, out: TextIO = sys.stdout) -> list[Outcome]:
    """Run every run of `spec` not yet completed one after another, each in a fresh process of its own,
    without Ray: for a machine that has no Ray (e.g. a GPU box with its own Python image), where the
    runs then have the whole machine, its GPU included, to themselves in turn. Same results, logs,
    skipping and resuming as `run_grid`; one progress line per finished run."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing

    log_dir, todo, outcomes = _prepare(spec, "one after another without Ray", out)
    already, started = len(outcomes), time.perf_counter()
    for done, run in enumerate(todo, start=1):
        submitted = time.perf_counter()
        # A fresh process per run, as under Ray (max_calls=1): no state carried from one run to the next.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                outcome = _landed(pool.submit(execute, run, spec.nodes, str(log_dir)).result(), run)
            except BrokenProcessPool:  # the run's process died (killed, out of memory): the grid goes on
                outcome = Outcome(run.name, "failed", time.perf_counter() - submitted, None,
                                  "its process died (killed or out of memory); its log says more")
        outcomes.append(outcome)
        print(progress_line(outcome, already + done, 0, len(todo) - done, time.perf_counter() - started, done,
                            already + len(todo)), file=out, flush=True)
    return outcomes


def _prepare(spec: Spec, where: str, out: TextIO) -> tuple[Path, list[Run], list[Outcome]]:
    """The grid's folders made; (its log folder, the runs not yet completed, a "skipped" outcome for each
    completed one), announced in one line saying `where` the runs go."""
    spec.runs_dir.mkdir(parents=True, exist_ok=True)
    log_dir = spec.output_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    todo = [run for run in spec.runs if run_status(run) != COMPLETED]
    outcomes = [Outcome(run.name, "skipped", 0.0, None) for run in spec.runs if run not in todo]
    print(f"{spec.name}: {len(spec.runs)} runs, {len(outcomes)} already completed, {len(todo)} to run {where}; "
          f"logs in {log_dir}", file=out, flush=True)
    return log_dir, todo, outcomes


def check_cluster_request(address: str | None, gpus_per_run: float | None) -> None:
    """GridError (one line) for a GPU fraction out of (0, 1], --gpus-per-run without a GPU here (embedded
    Ray), or an --address where nothing listens (Ray itself would retry for minutes)."""
    if gpus_per_run is not None and not 0 < gpus_per_run <= 1:
        raise GridError(f"--gpus-per-run {gpus_per_run}: give a fraction of one GPU in (0, 1], e.g. 0.5 for two "
                        "runs per GPU")
    if gpus_per_run and not address:
        import torch

        if not torch.cuda.is_available():
            raise GridError(f"--gpus-per-run {gpus_per_run}: this machine has no CUDA GPU; drop the flag to run "
                            "on CPUs, or give --address of a Ray cluster with GPUs")
    if address:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            reason = "give HOST:PORT" if isinstance(exc, ValueError) else (exc.strerror or str(exc))
            raise GridError(f"--address {address}: no Ray cluster answers there ({reason}); start one with "
                            "`ray start --head --port 6379`, or drop --address for an embedded Ray") from None


@contextmanager
def ray_cluster(address: str | None, workers: int, gpus_per_run: float | None) -> Iterator[int]:
    """Ray started (embedded, `workers` CPUs) or joined (`address`) for the grid, shut down after it;
    yields how many runs its resources hold at once."""
    import ray

    # Ray's coming default, set now: a run without --gpus-per-run sees the machine's GPUs as before Ray (training
    # uses CUDA when present) instead of having them hidden; with it, Ray shows the run only the GPU it holds.
    os.environ.setdefault(ACCEL_OVERRIDE, "0")
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                                ACCEL_OVERRIDE: os.environ[ACCEL_OVERRIDE]}}
    common = {"runtime_env": runtime_env, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise GridError(f"--address {address}: no Ray cluster answers there ({str(exc).splitlines()[0]}); "
                            "start one with `ray start --head --port 6379`, or drop --address for an embedded "
                            "Ray") from None
    else:  # "local": a new instance, never a cluster someone else started on this machine
        ray.init(address="local", num_cpus=workers, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 **common)
    try:
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if gpus_per_run and gpus < gpus_per_run:
            raise GridError(f"--gpus-per-run {gpus_per_run}: the Ray cluster at {address} has no GPU; drop the "
                            "flag to run on CPUs")
        slots = int(resources.get("CPU", 1))
        if gpus_per_run:
            slots = min(slots, math.floor(gpus / gpus_per_run + 1e-9))
        yield max(1, slots)
    finally:
        ray.shutdown()


def _schedule(todo: list[Run], nodes: int, log_dir: str, slots: int, gpus_per_run: float | None,
              already: int, out: TextIO) -> Iterator[Outcome]:
    """Submit `todo` as tasks, `slots` at a time (so "running" means started), yielding each outcome
    as it ends. An interrupted grid cancels its tasks; their checkpoints let the next call resume."""
    import ray
    from ray.exceptions import RayError

    # A fresh worker per run (max_calls=1), as separate runs had separate processes before Ray; a run is not
    # retried (a rerun of the command resumes it from its checkpoint instead).
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_run or 0, max_calls=1, max_retries=0)(execute)
    queue, pending = list(todo), {}
    total, started, done = already + len(todo), time.perf_counter(), 0
    try:
        while queue or pending:
            while queue and len(pending) < slots:
                run = queue.pop(0)
                pending[task.options(name=run.name).remote(run, nodes, log_dir)] = (run, time.perf_counter())
            [ref], _ = ray.wait(list(pending), num_returns=1)
            run, submitted = pending.pop(ref)
            try:
                outcome = _landed(ray.get(ref), run)
            except RayError as exc:  # the worker died (killed, out of memory): the run failed, the grid goes on
                outcome = Outcome(run.name, "failed", time.perf_counter() - submitted, None,
                                  f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
            done += 1
            print(progress_line(outcome, already + done, len(pending), len(queue), time.perf_counter() - started,
                                done, total), file=out, flush=True)
            yield outcome
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _landed(outcome: Outcome, run: Run) -> Outcome:
    """`outcome`, failed if its run's results.json is not where the spec says (a cluster machine that
    does not share the output folder)."""
    if outcome.status == COMPLETED and run_status(run) != COMPLETED:
        where = Path(run.config["output-dir"]) / run.name / "results.json"
        return replace(outcome, status="failed", error=f"{outcome.host} finished it but {where} is not here: give "
                       "every Ray machine the output-dir at the same path (a shared filesystem)")
    return outcome


def progress_line(o: Outcome, finished: int, running: int, left: int, elapsed: float, done_now: int,
                  total: int) -> str:
    """`[finished/total done, running, left] name: outcome (s); elapsed, estimated remaining`; the
    estimate is the elapsed time per run finished here times the runs not finished."""
    eta = elapsed / done_now * (running + left)
    what = (f"final accuracy {o.final_accuracy:.4f}" if o.final_accuracy is not None else "no accuracy")
    if o.status != COMPLETED:
        what = f"{o.status.upper()}: {o.error}"
    return (f"[{finished}/{total} done, {running} running, {left} left] {o.name}: {what} ({o.seconds:.0f} s); "
            f"elapsed {elapsed / 60:.1f} min, about {eta / 60:.0f} min left")
