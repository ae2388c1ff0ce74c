"""The grid's report: per group (a strategy and its [vary] values), mean ± standard deviation over
seeds, as a Markdown and a CSV table and two figures with seed bands.

Columns, per seed then averaged:
- final / best accuracy: the global model's test accuracy after the last round / its best round;
- clients: distinct clients that took part in at least one round (of the nodes in the run);
- MB down / up: all traffic of the run, decimal MB (10^6 bytes), failed attempts included;
- emulated time: the virtual clock after the last round (server_app/clock.py): each round lasts until
  its slowest included client (FLOPs / GFLOPS + bytes / bandwidth; clients of a round run in
  parallel) or the emulated deadline;
- peak memory: the largest measured peak training memory of a participating client (MB = 2^20 bytes).
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.spec import Spec  # noqa: E402
from fl_app.config import default_run_config  # noqa: E402
from fl_app.report import emulated_clock, load_run, participating_peaks  # noqa: E402
from fl_app.units import MB  # noqa: E402

METRICS = ("final_accuracy", "best_accuracy", "clients", "mb_down", "mb_up", "emulated_time_s", "peak_memory_mb")
HEADERS = ("final accuracy", "best accuracy", "clients", "MB down", "MB up", "emulated time s", "peak memory MB")


@dataclass
class SeedRun:
    seed: int
    accuracy: list[float]  # per round
    traffic_mb: list[float]  # cumulative down + up after each round
    clock_s: list[float]  # the virtual clock after each round, emulated seconds
    metrics: dict[str, float]


def collect(spec: Spec) -> dict[str, list[SeedRun]]:
    """Group -> its completed seed runs (runs not completed yet are left out, and counted in the table)."""
    groups: dict[str, list[SeedRun]] = defaultdict(list)
    for run in spec.runs:
        folder = spec.runs_dir / run.name
        if not (folder / "results.json").is_file():
            continue
        result = load_run(folder)
        if result.doc.get("status") != "completed":
            continue
        rounds = result.rounds
        summary = result.doc["summary"]
        peaks = participating_peaks(result)
        traffic = np.cumsum([(r["bytes_down"] + r["bytes_up"]) / MB for r in rounds]).tolist()
        clock = emulated_clock(result)
        groups[run.group].append(SeedRun(run.seed, [r["accuracy"] for r in rounds], traffic, clock, {
            "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
            "clients": summary["distinct_participants"], "mb_down": summary["total_bytes_down"] / MB,
            "mb_up": summary["total_bytes_up"] / MB, "emulated_time_s": clock[-1],
            "peak_memory_mb": max(peaks.values(), default=float("nan"))}))
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_rows(spec: Spec, groups: dict[str, list[SeedRun]]) -> list[dict[str, object]]:
    expected = defaultdict(int)
    for run in spec.runs:
        expected[run.group] += 1
    rows = []
    for group in expected:
        seeds = groups.get(group, [])
        row: dict[str, object] = {"group": group, "seeds": f"{len(seeds)}/{expected[group]}"}
        for m in METRICS:
            row[m] = mean_std([s.metrics[m] for s in seeds]) if seeds else None
        rows.append(row)
    return rows


def _fmt(value: object, digits: int) -> str:
    if value is None:
        return "-"
    mean, std = value  # type: ignore[misc]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


DIGITS = {"final_accuracy": 3, "best_accuracy": 3, "clients": 1, "mb_down": 1, "mb_up": 1, "emulated_time_s": 0,
          "peak_memory_mb": 1}


def write_tables(spec: Spec, rows: list[dict[str, object]], out: Path, preamble: str = "") -> None:
    lines = [f"# {spec.name}: mean ± std over seeds", "", preamble, "",
             "| group | seeds | " + " | ".join(HEADERS) + " |", "|" + "---|" * (len(HEADERS) + 2)]
    for row in rows:
        lines.append(f"| {row['group']} | {row['seeds']} | " + " | ".join(_fmt(row[m], DIGITS[m]) for m in METRICS)
                     + " |")
    lines += ["", (__doc__ or "").split("Columns, per seed then averaged:")[1].strip()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "seeds"] + [f"{m}_{part}" for m in METRICS for part in ("mean", "std")])
        for row in rows:
            cells = [v for m in METRICS for v in (row[m] if row[m] is not None else ("", ""))]
            writer.writerow([row["group"], row["seeds"], *cells])


def _band(ax: plt.Axes, x: np.ndarray, ys: np.ndarray, label: str) -> None:
    mean, std = ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(ys.shape[1])
    line, = ax.plot(x, mean, label=label, linewidth=1.6)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)


def write_figures(spec: Spec, groups: dict[str, list[SeedRun]], out: Path, title: str) -> list[Path]:
    """Accuracy vs round, vs cumulative traffic and vs emulated time (the virtual clock): mean over
    seeds, band = ± one standard deviation."""
    paths = []
    for kind in ("round", "traffic", "time"):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for group, seeds in groups.items():
            n = min(len(s.accuracy) for s in seeds)
            ys = np.array([s.accuracy[:n] for s in seeds])
            x = (np.arange(1, n + 1) if kind == "round"
                 else np.array([(s.traffic_mb if kind == "traffic" else s.clock_s)[:n] for s in seeds]).mean(0))
            _band(ax, x, ys, f"{group} (n={len(seeds)})")
        if kind == "round":
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("round")
        elif kind == "traffic":
            ax.set_xscale("log")
            ax.set_xlabel("cumulative traffic down + up (MB = 10^6 bytes, log scale)")
        else:
            ax.set_xlabel("emulated time on the devices (s, virtual clock; mean over seeds)")
        ax.set_ylabel("test accuracy of the global model")
        ax.set_title(f"{title}\naccuracy vs {kind}, mean ± std over seeds", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / f"accuracy_vs_{kind}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(spec: Spec) -> list[Path]:
    """Write table.md, table.csv and the three figures into the spec's output folder; their paths."""
    groups = collect(spec)
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    first = {**default_run_config(), **spec.runs[0].config}
    setting = (f"{first.get('model', 'cnn')} on {first.get('dataset', 'synthetic')}, {spec.nodes} nodes, "
               f"memory-pool = {first.get('memory-pool', '') or 'profiles'!r}, "
               f"emulated-deadline = {first.get('emulated-deadline', 0) or 'none'}")
    write_tables(spec, table_rows(spec, groups), out, f"{spec.description}\n\nSetting: {setting}.")
    return [out / "table.md", out / "table.csv"] + (write_figures(spec, groups, out, f"{spec.name}: {setting}")
                                                    if groups else [])
