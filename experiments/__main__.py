"""`python -m experiments SPEC.toml`: run a grid of experiments and write its report.

    python -m experiments experiments/specs/reproduction.toml            # run what is not done, then report
    python -m experiments experiments/specs/reproduction.toml --report   # report only, from what is done
    python -m experiments experiments/specs/reproduction.toml --list     # the runs, and which are done
    python -m experiments SPEC.toml --address HEAD:6379 --gpus-per-run 0.5  # on a Ray cluster, 2 runs per GPU
    python -m experiments SPEC.toml --sequential   # one run after another, no Ray (a machine without it)

Runs are Ray tasks: on an embedded local Ray by default (the spec's `workers` CPUs), or on the
cluster at `--address`; with `--sequential`, one after another in fresh processes, without Ray.
Re-running the same command skips finished runs and resumes interrupted ones, so a long grid can be
stopped and continued at any time. A bad spec is refused, whole, before anything runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.runner import GridError, StaleRun, run_grid, run_sequentially, run_status
from experiments.spec import SpecError, load_spec
from experiments.summary import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="the experiment spec (TOML), e.g. experiments/specs/reproduction.toml")
    parser.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    parser.add_argument("--list", action="store_true", help="only list the runs and their status")
    parser.add_argument("--workers", type=int, help="runs at once (default: the spec's `workers`; with --address, "
                        "as many as the cluster holds)")
    parser.add_argument("--address", help="run on the existing Ray cluster whose head is at HOST:PORT "
                        "(default: an embedded local Ray)")
    parser.add_argument("--gpus-per-run", type=float, metavar="FRACTION",
                        help="reserve this fraction of a GPU for each run, e.g. 0.5 (default: none reserved)")
    parser.add_argument("--sequential", action="store_true",
                        help="run one run after another, each in a fresh process, without Ray (a machine that "
                        "has no Ray); not with --address, --workers or --gpus-per-run")
    args = parser.parse_args(argv)
    if args.sequential and (args.address or args.workers or args.gpus_per_run):
        parser.error("--sequential runs one run at a time on this machine: drop --address, --workers and "
                     "--gpus-per-run")
    try:
        spec = load_spec(args.spec)
        if args.list:
            for run in spec.runs:
                print(f"{run.name:50s} {run_status(run) or 'not started'}")
            return 0
        started = time.perf_counter()
        if not args.report:
            outcomes = (run_sequentially(spec) if args.sequential else
                        run_grid(spec, args.workers, address=args.address, gpus_per_run=args.gpus_per_run))
            failed = [o for o in outcomes if o.status == "failed"]
            print(f"grid done in {(time.perf_counter() - started) / 60:.1f} min; {len(failed)} failed", flush=True)
        for path in write_report(spec):
            print(f"wrote {path}")
        if not args.report and not args.list and failed:
            print(f"error: {len(failed)} runs failed; their results.json and logs say why", file=sys.stderr)
            return 1
    except (SpecError, StaleRun, GridError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the runs stop where they are, and say how to go on (no Ray traceback)
        print(f"\ninterrupted: finished runs are kept and interrupted ones resume from their last saved round; "
              f"run `python -m experiments {args.spec}` again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
