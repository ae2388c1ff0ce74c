"""Where a run's seconds go: one run of an experiments spec, in this process, under cProfile.

    python benchmarks/profile_run.py SPEC.toml exclusivefl-seed0 --rounds 30 --out /tmp/profile

Runs the named run of SPEC (experiments/spec.py) with the in-process runner (experiments/inprocess.py:
the real ServerApp round loop and ClientApp, no Ray, no SuperLink), its `num-server-rounds` replaced by
--rounds, its results under --out/runs; writes --out/profile.txt (the 45 costliest functions by
cumulative, then by own time, in seconds) and prints the wall seconds. Trains on CUDA where present.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.inprocess import run_inprocess  # noqa: E402
from experiments.spec import load_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("run", help="the run's name, as `python -m experiments SPEC --list` gives it")
    parser.add_argument("--rounds", type=int, help="num-server-rounds (default: the spec's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    runs = {run.name: run for run in spec.runs}
    if args.run not in runs:
        print(f"error: {args.spec} has no run {args.run!r}; its runs: {', '.join(runs)}", file=sys.stderr)
        return 2
    config = dict(runs[args.run].config, **{"output-dir": str(args.out / "runs")})
    if args.rounds:
        config["num-server-rounds"] = args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    profile, started = cProfile.Profile(), time.perf_counter()
    doc = profile.runcall(run_inprocess, config, spec.nodes)
    print(f"{args.run}: {config['num-server-rounds']} rounds in {time.perf_counter() - started:.1f} s, "
          f"{doc['status']}, final accuracy {doc['summary'].get('final_accuracy')}")
    with open(args.out / "profile.txt", "w") as f:
        for key in ("cumulative", "tottime"):
            pstats.Stats(profile, stream=f).sort_stats(key).print_stats(45)
    return 0


if __name__ == "__main__":
    sys.exit(main())
