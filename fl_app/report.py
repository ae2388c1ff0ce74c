"""Figures and a summary table from one or more runs' results.json.

Usage:
    python -m fl_app.report RUN_DIR [RUN_DIR ...] [--out DIR] [--dpi 200] [--target-accuracy 0.4]

RUN_DIR is a run folder (`<output-dir>/<run-name>`, holding results.json) or the results.json
itself. The report goes to --out (default: the first run folder's parent / "report"):

    accuracy_vs_round.png, accuracy_vs_traffic.png, accuracy_vs_emulated_time.png
                          one line per run; traffic is cumulative decimal MB (10^6 bytes) down + up,
                          emulated time the run's virtual clock (server_app/clock.py: each round
                          lasts until its slowest included reply, or its emulated deadline), with
                          the target accuracy as a dotted line
    memory_per_client.png measured (filled) and predicted (hollow) peak training memory per client
                          against its device's memory budget (bar), one panel per run
    devices_time.png      emulated device time per round per client, grouped by device profile,
                          with the emulated deadline as a dashed line when the run had one
    profl.png             (runs whose rounds carry "active_block") stage / active block over rounds,
                          effective movement on a twin axis, dotted lines where a block froze
    reft.png              (REFT runs) submodel size and training FLOPs per sample against device GFLOPS
    summary.md, summary.csv  one row per run (results["summary"] where present and in step with the
                          rounds, the rest recomputed from the rounds), with the emulated time to
                          reach the target accuracy (--target-accuracy; default: the lowest best
                          accuracy among the runs, so that every run reaches it)

Legends and the summary name each run's strategy, model and dataset; runs evaluated on different
data (dataset, data-dir or test-size) are compared with one warning (stderr and summary.md). The
REFT panel marks devices without a submodel (left out, or never sent one) with an x at its foot.

Failed or stopped-early runs are kept and marked: "(failed)" / "(stopped n/N)" in the legends, an
x at their last point, and the status column. Memory is in MB of 2^20 bytes, as in the results.
From Python: `build_report([Path("runs/reft")], Path("report"))`. Bad input raises ReportError;
the command prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from fl_app.results import ResultsError, load_results  # noqa: E402

REQUIRED_TOP = ("status", "config", "rounds")
REQUIRED_ROUND = ("round", "accuracy", "bytes_down", "bytes_up", "clients")
REQUIRED_DEVICE = ("node_id", "profile", "gflops", "memory_mb")
CSV_FIELDS = ("run", "strategy", "model", "dataset", "status", "rounds_completed", "rounds_configured",
              "final_accuracy", "best_accuracy", "total_mb_down", "total_mb_up", "emulated_time_s",
              "target_accuracy", "time_to_target_s", "peak_memory_mb_max", "peak_memory_mb_median", "distinct_participants", "client_failures")
# Run-config keys that decide what accuracy is measured on: runs that differ in any are not comparable.
EVALUATION_KEYS = ("dataset", "data_dir", "test_size")


class ReportError(Exception):
    """Input that cannot be reported on; the message names the file and what is wrong."""


@dataclass
class Run:
    folder: Path
    doc: dict[str, Any]
    label: str = ""

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.doc["rounds"]

    @property
    def strategy(self) -> str:
        return str(self.doc["config"].get("strategy", "?"))

    @property
    def model(self) -> str:
        return str(self.doc["config"].get("model", "?"))

    @property
    def dataset(self) -> str:
        """The dataset name, a file or folder dataset by its last path part (npz:cifar.npz)."""
        name = str(self.doc["config"].get("dataset", "?"))
        kind, sep, where = name.partition(":")
        return f"{kind}:{Path(where).name}" if sep and kind in ("npz", "imagefolder") else name

    @property
    def configured(self) -> int | None:
        return self.doc["config"].get("num_server_rounds")

    @property
    def incomplete(self) -> bool:
        return self.doc["status"] != "completed" or (self.configured is not None
                                                     and len(self.rounds) < self.configured)


@dataclass
class ReportFiles:
    out: Path
    figures: list[Path] = field(default_factory=list)
    summary_md: Path | None = None
    summary_csv: Path | None = None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- loading

def load_run(path: Path) -> Run:
    file = path / "results.json" if path.is_dir() else path
    if not path.exists():
        raise ReportError(f"{path}: no such file or folder")
    if not file.is_file():
        raise ReportError(f"{file}: no such file (is {path} a run folder?)")
    try:
        doc = load_results(file.parent)
    except ResultsError as e:
        raise ReportError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or any(k not in doc for k in REQUIRED_TOP):
        raise ReportError(f"{file}: not a results file of this app (needs keys {', '.join(REQUIRED_TOP)})")
    if not isinstance(doc["config"], dict):
        raise ReportError(f"{file}: not a results file of this app (config must be an object)")
    _check_items(file, "rounds", doc["rounds"], REQUIRED_ROUND)
    _check_items(file, "devices", doc.setdefault("devices", []), REQUIRED_DEVICE)
    for r in doc["rounds"]:
        _check_items(file, f"round {r['round']} clients", r["clients"], ("node_id", "profile"))
    return Run(file.parent, doc)


def _check_items(file: Path, what: str, items: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(items, list):
        raise ReportError(f"{file}: {what} must be a list")
    for i, item in enumerate(items):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            raise ReportError(f"{file}: {what}[{i}] lacks {', '.join(missing)}")


def label_runs(runs: list[Run]) -> None:
    """Legend labels: strategy, model and dataset; the run folder too where those repeat."""
    bases = [f"{r.strategy}, {r.model}, {r.dataset}" for r in runs]
    for run, base in zip(runs, bases):
        run.label = base if bases.count(base) == 1 else f"{base} ({run.folder.name})"
        if run.doc["status"] == "failed":
            run.label += " (failed)"
        elif run.incomplete:
            run.label += f" (stopped {len(run.rounds)}/{run.configured})"


# ---------------------------------------------------------------- numbers

def comparability_warnings(runs: list[Run]) -> list[str]:
    """One warning if the runs were evaluated on different data (dataset, data-dir, test-size):
    their accuracies then do not compare."""
    differ = []
    for key in EVALUATION_KEYS:
        if key == "data_dir" and all(r.doc["config"].get("dataset") == "synthetic" for r in runs):
            continue  # synthetic data reads no folder
        values: dict[str, list[str]] = {}
        for run in runs:
            values.setdefault(repr(run.doc["config"].get(key)), []).append(run.folder.name)
        if len(values) > 1:
            shown = "; ".join(f"{v}: {', '.join(names)}" for v, names in values.items())
            differ.append(f"{key.replace('_', '-')} ({shown})")
    if not differ:
        return []
    return ["the runs were evaluated on different data, so their accuracies do not compare: they differ in "
            + " and in ".join(differ)]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def participating_peaks(run: Run) -> dict[int, float]:
    """Each participating client's measured peak training memory (MB), max over rounds."""
    peaks: dict[int, float] = {}
    for r in run.rounds:
        for c in r["clients"]:
            if c.get("participated") and c.get("peak_memory_mb") is not None:
                peaks[c["node_id"]] = max(peaks.get(c["node_id"], 0.0), c["peak_memory_mb"])
    return peaks


def emulated_clock(run: Run) -> list[float]:
    """The run's virtual clock at the end of each round, emulated seconds (results' emulated_clock_s).
    Results written before the clock existed lack it: for them each round lasted until its slowest
    client (its device_time_s), which is the clock's rule when no deadline or availability is set."""
    if all("emulated_clock_s" in r for r in run.rounds):
        return [float(r["emulated_clock_s"]) for r in run.rounds]
    slowest = [max((c.get("device_time_s") or 0 for c in r["clients"]), default=0) for r in run.rounds]
    return [float(t) for t in np.cumsum(slowest)]


def time_to_accuracy(run: Run, target: float) -> float | None:
    """Emulated seconds until the end of the first round whose accuracy reaches `target` (None: never)."""
    clock = emulated_clock(run)
    return next((t for r, t in zip(run.rounds, clock) if r["accuracy"] is not None and r["accuracy"] >= target),
                None)


def default_target(runs: list[Run]) -> float | None:
    """The lowest best accuracy among the runs: the highest target every run reaches."""
    bests = [max(accs) for run in runs if (accs := [r["accuracy"] for r in run.rounds if r["accuracy"] is not None])]
    return min(bests) if bests else None


def status_text(run: Run) -> str:
    n, total = len(run.rounds), run.configured
    if run.doc["status"] == "failed":
        text = f"failed: {run.doc.get('error') or 'no error recorded'}"
        return text + (f" (stopped at round {n}/{total})" if total is not None and n < total else "")
    if run.incomplete:
        return f"stopped at round {n}/{total} (status {run.doc['status']})"
    return "completed"


def summary_row(run: Run, target: float | None = None) -> dict[str, Any]:
    """The writer's summary where present and in step with the rounds; anything else recomputed.
    `target`: the accuracy (fraction) whose time to reach is reported."""
    s = run.doc.get("summary") or {}
    if s.get("rounds_completed") != len(run.rounds):  # stale (e.g. rounds cut by hand): recompute all
        s = {}
    accs = [r["accuracy"] for r in run.rounds if r["accuracy"] is not None]
    clients = [c for r in run.rounds for c in r["clients"]]
    peaks = list(participating_peaks(run).values())

    def pick(key: str, recomputed: Any) -> Any:
        return s[key] if key in s else recomputed

    return {
        "run": run.folder.name, "strategy": run.strategy, "model": run.model, "dataset": run.dataset,
        "status": status_text(run),
        "rounds_completed": pick("rounds_completed", len(run.rounds)),
        "rounds_configured": run.configured,
        "final_accuracy": pick("final_accuracy", run.rounds[-1]["accuracy"] if run.rounds else None),
        "best_accuracy": pick("best_accuracy", max(accs) if accs else None),
        "total_mb_down": pick("total_bytes_down", sum(r["bytes_down"] for r in run.rounds)) / 1e6,
        "total_mb_up": pick("total_bytes_up", sum(r["bytes_up"] for r in run.rounds)) / 1e6,
        "emulated_time_s": float(emulated_clock(run)[-1]) if run.rounds else 0.0,
        "target_accuracy": target,
        "time_to_target_s": time_to_accuracy(run, target) if target is not None else None,
        "peak_memory_mb_max": max(peaks) if peaks else None,
        "peak_memory_mb_median": statistics.median(peaks) if peaks else None,
        "distinct_participants": pick("distinct_participants",
                                      len({c["node_id"] for c in clients if c.get("participated")})),
        "client_failures": pick("client_failures", sum(1 for c in clients if c.get("error"))),
    }


# ---------------------------------------------------------------- tables

def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(rows: list[dict[str, Any]], path: Path, warnings: list[str] | None = None) -> None:
    head = ["run", "strategy", "model", "dataset", "status", "rounds", "final acc", "best acc", "MB down", "MB up",
            "emulated time s", "to target s", "peak mem max MB", "peak mem median MB", "clients", "failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r["run"], 0), _cell(r["strategy"], 0), _cell(r["model"], 0), _cell(r["dataset"], 0),
                 _cell(r["status"], 0),
                 f"{r['rounds_completed']}/{_cell(r['rounds_configured'], 0)}",
                 _cell(r["final_accuracy"], 4), _cell(r["best_accuracy"], 4), _cell(r["total_mb_down"], 2),
                 _cell(r["total_mb_up"], 2), _cell(r["emulated_time_s"], 2),
                 _cell(r["time_to_target_s"], 2),
                 _cell(r["peak_memory_mb_max"], 1), _cell(r["peak_memory_mb_median"], 1),
                 _cell(r["distinct_participants"], 0), _cell(r["client_failures"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = "".join(f"**Warning:** {w}.\n\n" for w in warnings or [])
    target = next((r["target_accuracy"] for r in rows if r["target_accuracy"] is not None), None)
    to_target = (f"to target: emulated seconds until a round's accuracy first reached {target:.4f} (— never); "
                 if target is not None else "")
    path.write_text("# Run summary\n\n" + notes + "\n".join(lines) + "\n\nMB down/up: decimal MB (10^6 bytes); "
                    "emulated time: the virtual clock at the last round (seconds on the devices); " + to_target
                    + "peak memory: participating clients' measured peaks, MB of 2^20 bytes.\n")


# ---------------------------------------------------------------- figures

def _save(fig: plt.Figure, path: Path, dpi: int, files: ReportFiles) -> None:
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                _readable_log(ax, axis)
    fig.tight_layout()
    if _thin_overlapping_xticks(fig):
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    files.figures.append(path)


def _labelled_log_ticks(axis: Any, low: float, high: float) -> int:
    return sum(1 for t in axis.get_major_locator().tick_values(low, high) if low <= t <= high)


def _readable_log(ax: plt.Axes, axis: Any) -> None:
    """A log axis with at least two labelled ticks: 1-2-5 ticks where decades are too few, and the
    limits widened to the neighbouring 1-2-5 values if even those leave one."""
    limits = ax.get_xlim if axis is ax.xaxis else ax.get_ylim
    low, high = sorted(limits())
    if low <= 0 or _labelled_log_ticks(axis, low, high) >= 2:
        return
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
    if _labelled_log_ticks(axis, low, high) >= 2:
        return
    steps = [m * 10.0 ** e for e in range(int(np.floor(np.log10(low))) - 1, int(np.ceil(np.log10(high))) + 2)
             for m in (1, 2, 5)]
    low, high = max(v for v in steps if v <= low), min(v for v in steps if v >= high)
    if low == high:
        high = min(v for v in steps if v > low)
    (ax.set_xlim if axis is ax.xaxis else ax.set_ylim)(low, high)


def _thin_overlapping_xticks(fig: plt.Figure) -> bool:
    """Where x tick labels overlap, turn them upright, then show every k-th; True if any changed."""
    changed = False
    for ax in (a for a in fig.axes if a.get_visible()):
        for attempt in range(2):
            fig.canvas.draw()
            labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent() for t in labels]
            if not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])):
                break
            changed = True
            if attempt == 0:
                for t in labels:
                    t.set_rotation(90)
                    t.set_horizontalalignment("center")
                continue
            widest = max(b.width for b in boxes)
            spacing = min((b.x0 - a.x0 for a, b in zip(boxes, boxes[1:])), default=widest) or 1.0
            step = int(np.ceil(1.2 * widest / spacing))
            for i, t in enumerate(labels):
                t.set_visible(i % step == 0)
    return changed


def _profile_colors(runs: list[Run]) -> dict[str, Any]:
    gflops = {d["profile"]: d.get("gflops", 0) for run in runs for d in run.doc["devices"]}
    names = sorted(gflops, key=lambda p: (gflops[p], p))
    cmap = plt.get_cmap("tab10")
    return {p: cmap(i % 10) for i, p in enumerate(names)}


def accuracy_figure(runs: list[Run], xaxis: str, path: Path, dpi: int, files: ReportFiles,
                    target: float | None = None) -> None:
    titles = {"round": ("Round", "Accuracy vs round"),
              "traffic": ("Cumulative traffic down + up (MB, 10^6 bytes)", "Accuracy vs communication"),
              "time": ("Emulated time on the devices (s, virtual clock)", "Accuracy vs emulated time")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if xaxis == "round":
            x = [r["round"] for r in run.rounds]
        elif xaxis == "traffic":
            x = np.cumsum([(r["bytes_down"] + r["bytes_up"]) / 1e6 for r in run.rounds])
        else:
            x = np.array(emulated_clock(run))
        y = [_num(r["accuracy"]) for r in run.rounds]
        (line,) = ax.plot(x, y, marker="o", markersize=3, linestyle="--" if run.incomplete else "-",
                          label=run.label)
        if run.incomplete and len(y):
            ax.plot(x[-1], y[-1], marker="X", markersize=10, color=line.get_color())
    ax.set_xlabel(titles[xaxis][0])
    if xaxis == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Test accuracy (fraction)")
    if xaxis == "time" and target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax.set_title(titles[xaxis][1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, dpi, files)


def _panels(n: int, width: float = 5.5, height: float = 4.2) -> tuple[plt.Figure, list[plt.Axes]]:
    """One panel per run, at most three per row; unused panels hidden."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def memory_figure(runs: list[Run], colors: dict[str, Any], path: Path, dpi: int, files: ReportFiles) -> None:
    most = max(len(run.doc["devices"]) for run in runs)
    fig, axes = _panels(len(runs), width=max(5.5, 1.2 + 0.3 * most))
    for ax, run in zip(axes, runs):
        devices = sorted(run.doc["devices"], key=lambda d: d["node_id"])
        measured = participating_peaks(run)
        predicted: dict[int, float] = {}
        for c in (c for r in run.rounds for c in r["clients"] if c.get("predicted_peak_memory_mb") is not None):
            predicted[c["node_id"]] = max(predicted.get(c["node_id"], 0.0), c["predicted_peak_memory_mb"])
        for i, d in enumerate(devices):
            color, nid = colors.get(d["profile"], "gray"), d["node_id"]
            ax.bar(i, d["memory_mb"], color=color, alpha=0.18, edgecolor=color)
            if nid in measured:
                ax.plot(i, measured[nid], "o", color=color, markersize=8)
                ax.annotate(f"{100 * measured[nid] / d['memory_mb']:.2g}%", (i, measured[nid]), textcoords="offset points",
                            xytext=(0, 8), ha="center", fontsize=7)
            else:  # sent a job that never reported its peak (missed the deadline, dropped out, failed), or none
                ax.annotate("no peak" if nid in predicted else "no job", (i, d["memory_mb"]), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=7)
            if nid in predicted:
                ax.plot(i, predicted[nid], "o", mfc="none", color=color, markersize=11)
        ax.set_xticks(range(len(devices)), [f"{d['node_id']}\n{d['profile']}" for d in devices], fontsize=7,
                      rotation=90 if len(devices) >= 5 else 0)
        ax.set_yscale("log")
        ax.set_ylabel("Memory (MB, log scale)")
        ax.set_xlabel("Client (node id, profile)")
        ax.set_title(f"{run.label}\nbar: budget, ●: measured peak (% of budget), ○: predicted", fontsize=9)
    _save(fig, path, dpi, files)


def device_time_figure(runs: list[Run], colors: dict[str, Any], path: Path, dpi: int,
                       files: ReportFiles) -> None:
    fig, axes = _panels(len(runs))
    for ax, run in zip(axes, runs):
        times: dict[str, list[float]] = {p: [] for p in colors}
        for c in (c for r in run.rounds for c in r["clients"] if c.get("device_time_s") is not None):
            times.setdefault(c["profile"], []).append(c["device_time_s"])
        names = [p for p in times if times[p]]
        if names:
            ax.boxplot([times[p] for p in names], positions=range(len(names)), widths=0.5, showfliers=False)
        rng = np.random.default_rng(0)
        for i, p in enumerate(names):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(times[p])), times[p], color=colors.get(p, "gray"), s=14)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=15)
        deadline = float(run.doc["config"].get("emulated_deadline") or 0)
        if deadline > 0:  # replies above it missed the round (not aggregated)
            ax.axhline(deadline, color="tab:red", linestyle="--", lw=1, label=f"emulated-deadline {deadline:g} s")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_yscale("log")
        ax.set_ylabel("Emulated device time per round (s, log)")
        ax.set_xlabel("Device profile")
        slowest = max(names, key=lambda p: max(times[p]), default=None)
        straggler = f"\nstraggler: {slowest} (up to {max(times[slowest]):.3g} s/round)" if slowest else ""
        ax.set_title(run.label + straggler, fontsize=9)
    _save(fig, path, dpi, files)


def profl_figure(runs: list[Run], path: Path, dpi: int, files: ReportFiles) -> None:
    fig, axes = _panels(len(runs), width=6.5)
    for ax, run in zip(axes, runs):
        rs = [r for r in run.rounds if "active_block" in r]
        x = [r["round"] for r in rs]
        ax.step(x, [r["active_block"] for r in rs], where="mid", color="tab:blue", label="active block")
        for r in rs:
            ax.axvspan(r["round"] - 0.5, r["round"] + 0.5, alpha=0.08,
                       color="tab:orange" if r.get("stage") == "shrink" else "tab:green", lw=0)
        for r in (r for r in rs if r.get("frozen")):
            ax.axvline(r["round"], color="black", linestyle=":", lw=1)
        em = [_num(r.get("effective_movement")) for r in rs]
        twin = None
        if any(np.isfinite(em)):
            twin = ax.twinx()
            twin.plot(x, em, "o-", color="tab:red", markersize=3, label="effective movement")
            twin.set_ylabel("Effective movement", color="tab:red")
        ax.set_xlabel("Round (shading: orange = shrink, green = grow; dotted: block frozen)")
        ax.set_ylabel("Active block (1-based)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(run.label + ("" if twin else "\n(effective movement not computed in any round)"), fontsize=9)
        handles = ax.get_legend_handles_labels()[0] + (twin.get_legend_handles_labels()[0] if twin else [])
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    _save(fig, path, dpi, files)


def reft_figure(runs: list[Run], colors: dict[str, Any], path: Path, dpi: int, files: ReportFiles) -> None:
    fig, grid = plt.subplots(len(runs), 2, figsize=(11, 4 * len(runs)), squeeze=False)
    for (ax_size, ax_flops), run in zip(grid, runs):
        gflops = {d["node_id"]: d["gflops"] for d in run.doc["devices"]}
        latest = {c["node_id"]: c for r in run.rounds for c in r["clients"] if c.get("model_size_mb") is not None}
        profiles = {d["node_id"]: d["profile"] for d in run.doc["devices"]}
        unsized = sorted(n for n in gflops if n not in latest)  # left out, or never sent a submodel
        left_out = {c["node_id"] for r in run.rounds for c in r["clients"] if c.get("left_out")} & set(unsized)
        for ax, key, unit, what in ((ax_size, "model_size_mb", "Submodel size (MB)", "submodel size"),
                                    (ax_flops, "train_flops_per_sample", "Training FLOPs per sample",
                                     "training FLOPs per sample")):
            for nid, c in sorted(latest.items()):
                if nid in gflops:
                    ax.scatter(gflops[nid], c[key], color=colors.get(c["profile"], "gray"), s=40)
                    ax.annotate(c["profile"], (gflops[nid], c[key]), xytext=(4, 4), textcoords="offset points",
                                fontsize=7)
            for nid in unsized:  # shown at the foot of the panel, at their compute
                tag = "left out" if nid in left_out else "no submodel"
                ax.scatter(gflops[nid], 0.04, transform=ax.get_xaxis_transform(), marker="x", s=40,
                           color=colors.get(profiles[nid], "gray"))
                ax.annotate(f"{profiles[nid]}: {tag}", (gflops[nid], 0.04), xycoords=ax.get_xaxis_transform(),
                            xytext=(4, 4), textcoords="offset points", fontsize=7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("Device compute (GFLOPS, log)")
            ax.set_ylabel(f"{unit}, log")
            missing = [f"{len(left_out)} of {len(gflops)} devices left out"] if left_out else []
            if len(unsized) > len(left_out):
                missing.append(f"{len(unsized) - len(left_out)} never sent a submodel")
            note = f"\nx: {', '.join(missing)}" if missing else ""
            ax.set_title(f"{run.label}: {what} per client vs device compute{note}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    _save(fig, path, dpi, files)


# ---------------------------------------------------------------- entry points

def build_report(run_dirs: list[Path], out: Path | None = None, dpi: int = 200,
                 target_accuracy: float | None = None) -> ReportFiles:
    """The figures and summary of module docstring in `out`; `target_accuracy` (fraction) whose emulated
    time to reach the summary gives (None: `default_target`)."""
    if not run_dirs:
        raise ReportError("no run folders given")
    runs = [load_run(Path(p)) for p in run_dirs]
    target = default_target(runs) if target_accuracy is None else target_accuracy
    label_runs(runs)
    out = out or runs[0].folder.parent / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{out}: cannot create the report folder ({e})") from None
    files = ReportFiles(out, warnings=comparability_warnings(runs))
    colors = _profile_colors(runs)
    for xaxis, name in (("round", "accuracy_vs_round"), ("traffic", "accuracy_vs_traffic"),
                        ("time", "accuracy_vs_emulated_time")):
        accuracy_figure(runs, xaxis, out / f"{name}.png", dpi, files, target)
    memory_figure(runs, colors, out / "memory_per_client.png", dpi, files)
    device_time_figure(runs, colors, out / "devices_time.png", dpi, files)
    profl = [r for r in runs if any("active_block" in rd for rd in r.rounds)]
    if profl:
        profl_figure(profl, out / "profl.png", dpi, files)
    reft = [r for r in runs if r.strategy == "reft"]
    if reft:
        reft_figure(reft, colors, out / "reft.png", dpi, files)
    rows = [summary_row(r, target) for r in runs]
    files.summary_md, files.summary_csv = out / "summary.md", out / "summary.csv"
    write_markdown(rows, files.summary_md, files.warnings)
    write_csv(rows, files.summary_csv)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_app.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder or its results.json")
    parser.add_argument("--out", type=Path, help="report folder (default: <first run's parent>/report)")
    parser.add_argument("--dpi", type=int, default=200, help="PNG resolution (default 200)")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="accuracy (fraction) whose emulated time to reach the summary gives "
                             "(default: the lowest best accuracy among the runs)")
    args = parser.parse_args(argv)
    if args.dpi <= 0:
        parser.error("--dpi must be a positive integer")
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        parser.error("--target-accuracy must be a fraction in (0, 1], e.g. 0.4")
    try:
        files = build_report(args.runs, args.out, args.dpi, args.target_accuracy)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    for warning in files.warnings:
        print(f"report: warning: {warning}", file=sys.stderr)
    print(f"report: {len(files.figures)} figures, summary.md and summary.csv in {files.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
