"""The GPU path, proven in one call: CUDA-relevant tests, ResNet-18's measured training memory on the
GPU beside the cost model, and the ProFL authors' setup for as many rounds as fit the time left.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check     # on a CUDA machine, 9.5 min
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check            # anywhere, CPU, tiny settings (CI)

Writes, under --out:
- environment.txt: torch, CUDA, the device;
- tests.txt (a): the fast tests of training, measurement, the cost model, ProFL and DepthFL, which
  train on CUDA when present (fl_app.training.accelerator);
- profl_memory.txt (b): `benchmarks/profl.py memory` for full-width ResNet-18 at batch 64 on the GPU
  (peak = torch.cuda.max_memory_allocated over a real step) for full training and every ProFL step,
  beside the cost model's prediction;
- profl_paper/ (c): experiments/specs/profl_paper.toml restricted to profl, allsmall and exclusivefl,
  with num-server-rounds sized from a timed full-model local training so the three fit the minutes
  (a) and (b) leave of --minutes (at most 8), run as Ray tasks sharing the GPU (--gpus-per-run 1/3),
  or one after another (`--sequential`) where Ray is not installed; --nodes and --data-dir fit it to a
  machine that carries only a slice of CIFAR-10; its spec, the command's output, runs, table and figures;
- summary.txt: each part's command, exit status and seconds.

With --tiny (no GPU needed): a few quick tests, the small CNN at batch 8, and the spec with the CNN on
synthetic data, 2 nodes, 16 images each, 1 round, 2 of the 3 strategies; tests/test_gpu_check.py
runs it so this script does not rot.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w
import torch

REPO = Path(__file__).resolve().parents[1]
PAPER_SPEC = REPO / "experiments" / "specs" / "profl_paper.toml"
STRATEGIES = ["profl", "allsmall", "exclusivefl"]
CUDA_TESTS = ["tests/test_training.py", "tests/test_cost.py", "tests/test_profl.py", "tests/test_depthfl.py",
              "tests/test_model_width.py"]
TINY_TESTS = ["tests/test_model_width.py", "-k", "cost_model_prices"]
TINY_CONFIG = {"dataset": "synthetic", "max-client-examples": 16, "public-size": 16, "test-size": 32,
               "num-server-rounds": 1, "batch-size": 8, "local-epochs": 1, "model": "cnn",
               "fraction-train": 1.0}


def part(name: str, command: list[str], out: Path, log: str, timeout_s: float | None = None) -> tuple[int, float]:
    """Run `command` from the repository root, its output appended to `out/log`; (exit status, seconds).

    A command past `timeout_s` is interrupted as Ctrl-C would (SIGINT to its process group: the
    experiments command stops its runs, which resume where they stopped), then killed with its whole
    session 60 s later; its status is then 124."""
    started = time.perf_counter()
    with open(out / log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    seconds = time.perf_counter() - started
    print(f"{name}: exit {rc} in {seconds:.0f} s; output in {out / log}", flush=True)
    return rc, seconds


def seconds_per_round(config: dict, device: str) -> float:
    """One round's local training, timed: the full model trained by every sampled client for its local
    epochs on random images (the largest job of the three strategies; their ProFL steps and small
    models cost less), plus 20 % for evaluation and the round's bookkeeping."""
    from fl_app.models import ModelSpec, build_model
    from fl_app.training import TrainConfig, make_optimizer, train_step

    model = build_model(ModelSpec(config["model"])).to(device)
    optimizer = make_optimizer(model, TrainConfig(lr=config["lr"], momentum=config["momentum"]))
    batch = config["batch-size"]
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    train_step(model, optimizer, x, y)  # warm-up: kernels, allocator
    steps = 10
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, x, y)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / steps
    clients = max(1, round(config["fraction-train"] * config["nodes"]))
    steps_per_client = math.ceil(config["max-client-examples"] / batch) * config["local-epochs"]
    return 1.2 * per_step * steps_per_client * clients


def paper_spec(out: Path, tiny: bool, minutes: float, data_dir: str | None, device: str,
               nodes: int | None = None) -> tuple[Path, str]:
    """profl_paper.toml for profl, allsmall and exclusivefl, its rounds sized to `minutes`; (path, why).
    `nodes`: the federation's size instead of the spec's 100 (each still holds 500 images)."""
    raw = tomllib.loads(PAPER_SPEC.read_text())
    raw["nodes"] = nodes or raw["nodes"]
    config = dict(raw["config"])
    config["data-dir"] = data_dir or str((PAPER_SPEC.parent / config["data-dir"]).resolve())
    strategies = STRATEGIES
    if tiny:
        config |= TINY_CONFIG
        raw["nodes"], strategies = 2, STRATEGIES[:2]
        why = "tiny: 1 round"
    else:
        per_round = seconds_per_round({**config, "nodes": raw["nodes"]}, device)
        # The three run at once on one GPU (a third each) or one after another: count their rounds as if
        # one after another, since small models leave the GPU mostly idle but the three still contend for it.
        # Half the minutes: a round's CPU work (each client's model serialised, the checkpoint) is not timed.
        config["num-server-rounds"] = max(1, int(minutes * 60 * 0.5 / (len(strategies) * per_round)))
        why = (f"{per_round:.1f} s per round (timed full-model training, x1.2), x{len(strategies)} strategies, "
               f"50 % of {minutes:g} min -> {config['num-server-rounds']} rounds")
    raw |= {"name": "profl-paper-gpu-check", "output-dir": "profl_paper", "strategies": strategies, "seeds": [0],
            "config": config}
    raw["description"] = raw.get("description", "") + f"\nSized by benchmarks/gpu_check.py: {why}."
    path = out / "profl_paper.toml"
    path.write_text(tomli_w.dumps(raw))
    return path, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the one folder everything is written to")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized settings (no GPU needed): checks the script")
    parser.add_argument("--minutes", type=float, default=9.5,
                        help="wall minutes for the whole check; (c) gets what (a) and (b) leave, at most 8")
    parser.add_argument("--data-dir", help="(c): the folder holding cifar10/ (default: the spec's)")
    parser.add_argument("--nodes", type=int, help="(c): nodes of 500 images each (default: the spec's 100)")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); add --tiny for the CPU check",
              file=sys.stderr)
        return 2
    device = "cuda" if cuda and not args.tiny else "cpu"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.txt").write_text(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
        f"{torch.cuda.get_device_name(0) if cuda else 'cpu'}, tiny {args.tiny}\n")
    py = sys.executable
    results = []
    tests = TINY_TESTS if args.tiny else CUDA_TESTS
    # (a) and (b) are bounded so that a hang in either still leaves (c) its minutes.
    bound = None if args.tiny else args.minutes * 60 / 4
    results.append(("(a) tests", *part("(a) tests", [py, "-m", "pytest", "-q", "-m", "not slow", *tests], out,
                                       "tests.txt", timeout_s=bound)))
    model, batch = ("cnn", "8") if args.tiny else ("resnet18", "64")
    results.append(("(b) memory", *part("(b) memory", [py, "benchmarks/profl.py", "memory", "--models", model,
                                                       "--batch", batch, "--device", device], out, "profl_memory.txt",
                                                  timeout_s=bound)))
    left = min(8.0, args.minutes - (time.perf_counter() - begin) / 60 - 1.0)  # 1 min: startup, report, slack
    spec, why = paper_spec(out, args.tiny, left, args.data_dir, device, args.nodes)
    print(f"(c) {why}", flush=True)
    if importlib.util.find_spec("ray") is None:  # e.g. a GPU machine's own Python image
        grid = [py, "-m", "experiments", str(spec), "--sequential"]
    else:
        grid = [py, "-m", "experiments", str(spec), "--workers", str(len(STRATEGIES))]
        if device == "cuda":
            grid += ["--gpus-per-run", f"{1 / len(STRATEGIES):.3f}"]
    rc, seconds = part("(c) profl_paper", grid, out, "experiments.txt", timeout_s=None if args.tiny else left * 60)
    if rc == 124:  # the table and figures of the runs that finished
        part("(c) report", [py, "-m", "experiments", str(spec), "--report"], out, "experiments.txt")
    results.append(("(c) profl_paper", rc, seconds))
    lines = [f"{name}: exit {rc}, {seconds:.0f} s" for name, rc, seconds in results]
    (out / "summary.txt").write_text("\n".join(lines + [f"(c) sized: {why}"]) + "\n")
    failed = [name for name, rc, _ in results if rc != 0]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}; everything in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
