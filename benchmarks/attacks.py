"""Hostile participants: final accuracy of every strategy, clean / attacked / attacked with the defence.

    nice -n 10 python benchmarks/attacks.py run      # the grid, resumable: finished cells are skipped
    python benchmarks/attacks.py table               # the table of what finished
    python benchmarks/attacks.py seeds --seeds 0,1,2 --defence fltrust,fltrust:labels   # changes paired over seeds
    python benchmarks/attacks.py run --seeds 1,2 --strategies exclusivefl   # the same cells at other seeds
    python benchmarks/attacks.py run --workers 15    # cells side by side in 15 processes
    python benchmarks/attacks.py run --dirichlet-alpha 0.5 --defence fltrust,fltrust:labels
        --cells benchmarks/results/attacks_dirichlet0.5 --scenarios "clean,2 labelflippers"   # label skew

Real MNIST (/work/shared/data), cnn, 10 in-process nodes x 300 training images, 8 rounds, seed 0 (`--seeds`), the
default device mix; every cell is a full run of the ServerApp's round loop against the real ClientApp
(benchmarks/run_inprocess.py) with node-config `fault` (client_app/faults.py) on the attackers. The
attacker is node 10 (a workstation: every strategy gives it work); the two label flippers nodes 9-10.
Two reference columns give the run with those nodes' every reply refused (what a defence that gives the
attackers no weight at best leaves: where they are a large part of the devices holding a part of the
model, that is below the clean run).
Each cell runs with `aggregation = mean` (no defence) and with the defence (`--defence`, default: the
run config's default `aggregation`). Results: one small JSON per cell under benchmarks/results/attacks/
(with the commit it ran at); `table` and `seeds` print the tables (committed in benchmarks/results/attacks.txt). Every cell trains on one
thread: an 8-round run's final accuracy moves with the summation order, so only cells run alike compare.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402

from benchmarks.run_inprocess import REPO  # noqa: E402
from experiments.inprocess import InProcessGrid  # noqa: E402
from fl_app.aggregation import Aggregation, AggregationError  # noqa: E402
from fl_app.config import default_run_config  # noqa: E402
from fl_app.results import load_results  # noqa: E402
from server_app.server_app import main as server_main  # noqa: E402
from server_app.strategies import STRATEGIES  # noqa: E402

DATA = str(REPO.parent / "shared" / "data")
CELLS = REPO / "benchmarks" / "results" / "attacks"
NODES = 10
BASE = {"dataset": "mnist", "data-dir": DATA, "model": "cnn", "max-client-examples": 300, "num-server-rounds": 8,
        "test-size": 2000, "min-nodes": NODES - 2}  # the run goes on without nodes the server refuses
# scenario -> node id -> node-config fault
SCENARIOS = {
    "clean": {},
    "replacement": {10: "boost:10"},
    "signflip": {10: "signflip:10"},
    "inflated+labelflip": {10: "inflate-examples;labelflip"},
    "adversarial-logits": {10: "adversarial-logits"},  # REFT only: the others send weights
    "2 labelflippers": {9: "labelflip", 10: "labelflip"},
    # References, not attacks: the run without what the attackers contribute (their every reply is refused as
    # NaN). A defence that gives an attacker no weight can do no better than this; where the attacker is one of
    # few devices that hold a part of the model, it is below the clean run.
    "node 10 refused": {10: "nan"},
    "nodes 9-10 refused": {9: "nan", 10: "nan"},
}
REFERENCES = ("node 10 refused", "nodes 9-10 refused")
CELL_THREADS = 1  # torch threads per cell, whatever --workers is: results must not depend on it


def scenarios_of(strategy: str) -> list[str]:
    return [s for s in SCENARIOS if s != "adversarial-logits" or strategy == "reft"]


def run_cell(strategy: str, scenario: str, aggregation: str, seed: int = 0, data_dir: str = DATA,
             dirichlet_alpha: float | None = None) -> dict:
    """One full in-process run; its final accuracy, rounds refused and replies rejected. With
    `dirichlet_alpha`, the clients' data is label-skewed (run-config `partition = "dirichlet"`)."""
    skew = {"partition": "dirichlet", "dirichlet-alpha": dirichlet_alpha} if dirichlet_alpha is not None else {}
    with tempfile.TemporaryDirectory() as out:
        config = {**BASE, **skew, "data-dir": data_dir, "strategy": strategy, "aggregation": aggregation,
                  "output-dir": out, "run-name": "run", "seed": seed}
        grid = InProcessGrid(config, NODES, node_config={n: {"fault": f} for n, f in SCENARIOS[scenario].items()})
        started = time.perf_counter()
        error = None
        try:
            server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
        except Exception as exc:  # a run the attack stopped is a result too
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        results = load_results(Path(out) / "run")
    rounds = results.get("rounds", [])
    return {"strategy": strategy, "scenario": scenario, "aggregation": aggregation, "seed": seed,
            "dirichlet_alpha": dirichlet_alpha, "final_accuracy": rounds[-1]["accuracy"] if rounds else None, "rounds": len(rounds),
            "refused_rounds": sum(1 for r in rounds if r.get("aggregate_refused")),
            "rejected_replies": sum(r.get("rejected", 0) for r in rounds),
            "label_refused": sum(len(r.get("label_refused") or {}) for r in rounds),
            "status": results.get("status"), "error": error, "seconds": round(time.perf_counter() - started, 1),
            "code": _commit(), "machine": _machine()}


def _machine() -> str:
    """The CPU a cell ran on (architecture, torch's kernel level, model name): one thread's summation still
    differs between CPUs (FedAvg, two flippers, fltrust:labels, seed 0: 0.9045 on one machine, 0.909 on
    another, same commit), so a table says which machines its cells come from."""
    model = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    return " ".join(filter(None, (platform.machine(), torch.backends.cpu.get_cpu_capability(), model)))


def _commit() -> str | None:
    """The commit the cell ran at (with '+' when the tree had changes), so a table never mixes code silently."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def cell_path(strategy: str, scenario: str, aggregation: str, seed: int = 0, cells: Path = CELLS) -> Path:
    """The cell's JSON under `cells`; seed 0's name carries no seed (the grid's first cells were all seed 0)."""
    name = f"{strategy}__{scenario.replace(' ', '_').replace('+', '_')}__{aggregation.replace(':', '_')}"
    return cells / (f"{name}.json" if seed == 0 else f"{name}__seed{seed}.json")


def grid(defence: str, strategies: list[str]) -> list[tuple[str, str, str]]:
    """Every cell, the clean pairs first (they decide the default), then attacked with the defence, then without."""
    cells = [(s, "clean", a) for s in strategies for a in ("mean", defence)]
    cells += [(s, sc, defence) for s in strategies for sc in scenarios_of(s) if sc != "clean"]
    cells += [(s, sc, "mean") for s in strategies for sc in scenarios_of(s) if sc != "clean" and sc not in REFERENCES]
    return cells


def run(defences: list[str], strategies: list[str], scenarios: list[str], seeds: list[int], workers: int = 1,
        undefended: bool = True, cells: Path = CELLS, data_dir: str = DATA, dirichlet_alpha: float | None = None
        ) -> None:
    """Every cell of `grid` not yet written under `cells`, for each seed and defence in turn (without the
    attacked cells under `mean` unless `undefended`), in `workers` processes (spawned), each writing its
    cell when done, so a run cut short keeps every finished cell. Every cell trains on one thread
    (`CELL_THREADS`) however many workers run: the summation order changes with the thread count, and an
    8-round run's final accuracy with it (ExclusiveFL, two flippers, seed 0, under a since removed
    per-layer gate on FLTrust: 0.866 on two threads, 0.783 on one)."""
    cells.mkdir(parents=True, exist_ok=True)
    todo = [(strategy, scenario, aggregation, seed) for seed in seeds for defence in defences
            for strategy, scenario, aggregation in grid(defence, strategies)
            if scenario in scenarios and (undefended or aggregation != "mean" or scenario == "clean")
            and not cell_path(strategy, scenario, aggregation, seed, cells).exists()]
    todo = list(dict.fromkeys(todo))  # the mean cells of several defences once
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=torch.set_num_threads,
                             initargs=(CELL_THREADS,)) as pool:
        for future in as_completed([pool.submit(_write_cell, *cell, cells, data_dir, dirichlet_alpha)
                                    for cell in todo]):
            future.result()


def _write_cell(strategy: str, scenario: str, aggregation: str, seed: int, cells: Path, data_dir: str,
                dirichlet_alpha: float | None) -> None:
    result = run_cell(strategy, scenario, aggregation, seed, data_dir, dirichlet_alpha)
    cell_path(strategy, scenario, aggregation, seed, cells).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


def table(defences: list[str], strategies: list[str], seed: int = 0, cells: Path = CELLS,
          markdown: bool = False, scenarios: list[str] | None = None) -> None:
    """One row per strategy, one column per scenario; each cell 'mean / defence 1 / defence 2 ...'; `markdown`:
    the rows as a Markdown table (the README's)."""
    def cell(strategy: str, scenario: str, aggregation: str) -> str:
        path = cell_path(strategy, scenario, aggregation, seed, cells)
        if not path.exists():
            return "--"
        r = json.loads(path.read_text())
        if r["final_accuracy"] is None:
            return "failed"
        mark = "*" if r["refused_rounds"] else ""
        return f"{r['final_accuracy']:.3f}{mark}" + ("!" if r["error"] else "")

    columns = ["mean", *defences]
    print(f"final accuracy after {BASE['num-server-rounds']} rounds: real MNIST, cnn, {NODES} nodes x "
          f"{BASE['max-client-examples']} images ({_split(cells)}), test-size {BASE['test-size']}, seed {seed}, "
          "default device mix;")
    print(f"each cell '{' / '.join(columns)}' (aggregation); attacker node 10, flippers 9-10")
    print("* some round's aggregate was refused as unsound (previous model kept); ! the run stopped early; -- not run")
    shown = [sc for sc in SCENARIOS if scenarios is None or sc in scenarios]
    rows = [["strategy", *shown]]
    for strategy in strategies:
        rows.append([strategy] + [" / ".join(cell(strategy, sc, a) for a in columns)
                                  if sc in scenarios_of(strategy) else "n/a" for sc in shown])
    _print_rows(rows, markdown)
    print(_code_versions(cells, [seed]))


def seed_table(defences: list[str], strategies: list[str], seeds: list[int], cells: Path = CELLS,
               markdown: bool = False, scenarios: list[str] | None = None) -> None:
    """Paired over seeds: each scenario's final accuracy minus the same seed's clean run under the same
    aggregation (the clean row: the defence minus `mean`), in points, as 'mean [min, max] n' over the
    seeds that have both cells; `markdown`: one row per strategy, one column per scenario, each cell
    'mean (min)' per defence, joined by ' / '."""
    def accuracy(strategy: str, scenario: str, aggregation: str, seed: int) -> float | None:
        """None when the cell was not run; a run the attack stopped before any round counts as 0."""
        path = cell_path(strategy, scenario, aggregation, seed, cells)
        return (json.loads(path.read_text())["final_accuracy"] or 0.0) if path.exists() else None

    def change(strategy: str, scenario: str, defence: str) -> str:
        pairs = [(accuracy(strategy, scenario, defence, seed),
                  accuracy(strategy, "clean", "mean" if scenario == "clean" else defence, seed)) for seed in seeds]
        points = [100 * (a - b) for a, b in pairs if a is not None and b is not None]
        if not points:
            return "--"
        mean = sum(points) / len(points)
        if markdown:  # a cell with fewer seeds than asked says so: its mean is not the others'
            short = f", {len(points)} of {len(seeds)} seeds" if len(points) < len(seeds) else ""
            return f"{mean:+.1f} ({min(points):+.1f}{short})"
        return f"{mean:+5.1f} [{min(points):+5.1f}, {max(points):+5.1f}] {len(points)}"

    print(f"change in final accuracy (points) against the same seed's clean run under the same aggregation "
          f"(clean: against mean), {_split(cells)},\nseeds {','.join(map(str, seeds))}: "
          + ("mean (worst seed), each cell '" + " / ".join(defences) + "'" if markdown
             else "mean [min, max] and the number of seeds with both cells"))
    shown = [sc for sc in SCENARIOS if scenarios is None or sc in scenarios]
    if markdown:
        rows = [["strategy", *shown]]
        rows += [[strategy, *(" / ".join(change(strategy, sc, d) for d in defences) if sc in scenarios_of(strategy)
                              else "n/a" for sc in shown)] for strategy in strategies]
    else:
        rows = [["strategy", "scenario", *defences]]
        rows += [[strategy, scenario, *(change(strategy, scenario, d) for d in defences)]
                 for strategy in strategies for scenario in scenarios_of(strategy) if scenario in shown]
    _print_rows(rows, markdown)
    print(_code_versions(cells, seeds))


def _print_rows(rows: list[list[str]], markdown: bool = False) -> None:
    """Rows of text cells, each column padded to its widest cell; `markdown`: a Markdown table, the first row its
    header."""
    if markdown:
        for i, r in enumerate(rows):
            print("| " + " | ".join(v.strip() for v in r) + " |")
            if i == 0:
                print("|" + "---|" * len(r))
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _split(cells: Path) -> str:
    """How the cells' clients' data was split, from the first cell: IID, or Dirichlet label skew."""
    alpha = next((json.loads(p.read_text()).get("dirichlet_alpha") for p in sorted(cells.glob("*.json"))), None)
    return "IID" if alpha is None else f"Dirichlet label skew, alpha {alpha:g}"


def _code_versions(cells: Path, seeds: list[int]) -> str:
    """Which commits and machines the seeds' cells ran at and on ("unrecorded": cells written before cells
    named theirs)."""
    commits: Counter[str] = Counter()
    machines: Counter[str] = Counter()
    for path in cells.glob("*.json"):
        seed = int(path.stem.rpartition("__seed")[2]) if "__seed" in path.stem else 0
        if seed in seeds:
            cell = json.loads(path.read_text())
            commits[cell.get("code") or "unrecorded"] += 1
            machines[cell.get("machine") or "unrecorded"] += 1
    return "cells ran at: " + "; on: ".join(", ".join(f"{what} ({n})" for what, n in sorted(counts.items()))
                                           for counts in (commits, machines))


def _bad_argument(defences: list[str], strategies: list[str], scenarios: list[str]) -> str | None:
    """One line naming the first unknown defence, strategy or scenario and the valid ones; None if all are known."""
    for defence in defences:
        try:
            Aggregation.parse(defence)
        except AggregationError as exc:
            return f"--defence: {exc}"
    for given, known, flag in ((strategies, STRATEGIES, "--strategies"), (scenarios, SCENARIOS, "--scenarios")):
        unknown = [x for x in given if x not in known]
        if unknown:
            return f"{flag}: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(known)}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("run", "table", "seeds"),
                        help="run the cells; table: one seed's accuracies; seeds: changes paired over --seeds")
    parser.add_argument("--defence", default=default_run_config()["aggregation"],
                        help="the defences' aggregations, comma-separated (default: the run config's)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="run (table, seeds: show) only these (comma-separated)")
    parser.add_argument("--seeds", "--seed", default="0",
                        help="the runs' seeds (data split, devices, training), comma-separated; table: the first")
    parser.add_argument("--workers", type=int, default=1, help="run: cells side by side in this many processes")
    parser.add_argument("--skip-undefended", action="store_true",
                        help="run: leave out the attacked cells under aggregation mean (no defence)")
    parser.add_argument("--cells", type=Path, default=CELLS, help=f"the cells' folder (default: {CELLS})")
    parser.add_argument("--data-dir", default=DATA, help=f"MNIST's folder (default: {DATA})")
    parser.add_argument("--markdown", action="store_true", help="table, seeds: print a Markdown table")
    parser.add_argument("--dirichlet-alpha", type=float, default=None,
                        help="run: label-skewed clients (Dirichlet, this alpha) instead of IID; give their own --cells")
    args = parser.parse_args()
    strategies, defences = args.strategies.split(","), args.defence.split(",")
    problem = _bad_argument(defences, strategies, args.scenarios.split(","))
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        problem = problem or f"--seeds: {args.seeds!r} is not a comma-separated list of integers (e.g. 0,1,2)"
    if problem:  # before any cell runs: a typo would otherwise write "failed" cells or a table of "--"
        parser.exit(2, f"error: {problem}\n")
    if args.part != "run" and not any(args.cells.glob("*.json")):
        parser.exit(2, f"error: --cells: no cells in {args.cells}; run them first (attacks.py run), or give the "
                       f"folder they are in, e.g. {CELLS.relative_to(REPO)}\n")
    if args.part == "run":
        if args.dirichlet_alpha is not None and args.cells == CELLS:
            parser.exit(2, "error: --dirichlet-alpha: give the skewed cells their own folder, e.g. --cells "
                           "benchmarks/results/attacks_dirichlet0.5 (the IID tables read the default one)\n")
        run(defences, strategies, args.scenarios.split(","), seeds, args.workers, not args.skip_undefended,
            args.cells, args.data_dir, args.dirichlet_alpha)
    elif args.part == "table":
        table(defences, strategies, seeds[0], args.cells, args.markdown, args.scenarios.split(","))
    else:
        seed_table(defences, strategies, seeds, args.cells, args.markdown, args.scenarios.split(","))


if __name__ == "__main__":
    main()
