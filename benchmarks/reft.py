"""REFT figures: submodel sizes per device, traffic per round vs FedAvg, accuracy vs the baselines.

    python benchmarks/reft.py sizes      # VGG-16 (4096 classifier) submodels for the default device mix
    python benchmarks/reft.py bytes      # bytes per round after setup, REFT vs FedAvg, real CIFAR-10
    python benchmarks/reft.py accuracy   # 5 strategies, same rounds/devices/seed, real CIFAR-10

Each part prints a table; outputs are committed under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_inprocess import REPO, run_inprocess  # noqa: E402
from fl_app.config import RunConfig  # noqa: E402
from fl_app.data import make_synthetic  # noqa: E402
from fl_app.profiles import load_profile, parse_device_mix  # noqa: E402
from fl_app.width import widths_at_ratio  # noqa: E402
from server_app.strategies.base import Device, Federation  # noqa: E402

DATA = str(REPO.parent / "shared" / "data")
MB = 2**20


def sizes() -> None:
    config = RunConfig.from_mapping({"model": "vgg16-fc4096", "strategy": "reft"})
    names = parse_device_mix(config.device_mix)
    devices = [Device(i + 1, i, load_profile(n), 0) for i, n in enumerate(names)]
    fed = Federation(config, devices, make_synthetic(train_size=10, test_size=2), np.random.default_rng(0))
    full = fed.cost(fed.full_spec())
    print(f"model vgg16-fc4096, 3x32x32, batch {config.batch_size}, compute-slack {config.compute_slack}, "
          f"min-keep-ratio {config.min_keep_ratio}, device-mix {config.device_mix}")
    print(f"full model: {full.size_mb:.1f} MB, {full.forward_macs_per_sample / 1e9:.3f} G MACs/image, "
          f"{full.train_flops_per_sample / 1e9:.3f} GFLOP/image training, "
          f"{fed.peak_memory_mb(full):.0f} MB peak training memory")
    print(f"{'profile':22s} {'GFLOPS':>7s} {'mem MB':>7s} {'ratio':>6s} {'size MB':>8s} {'G MACs':>7s} "
          f"{'FLOPs/budget':>12s} {'peak MB':>8s} {'fits':>5s}")
    seen = set()
    for d in devices:
        if d.profile.name in seen:
            continue
        seen.add(d.profile.name)
        ratio = fed.affordable_ratio(d)
        if ratio is None:
            print(f"{d.profile.name:22s} cannot afford the floor")
            continue
        cost = fed.cost(fed.full_spec().with_widths(widths_at_ratio(fed.full_spec(), ratio)))
        use = cost.train_flops_per_sample / fed.flops_budget(d)
        peak = fed.peak_memory_mb(cost)
        print(f"{d.profile.name:22s} {d.profile.gflops:7.1f} {d.profile.memory_mb:7.0f} {ratio:6.3f} "
              f"{cost.size_mb:8.2f} {cost.forward_macs_per_sample / 1e9:7.4f} {use:12.3f} {peak:8.1f} "
              f"{str(use <= 1 + 1e-9 and peak <= d.profile.memory_mb):>5s}")


def _cifar(**overrides) -> dict:
    return {"dataset": "cifar10", "data-dir": DATA, "seed": 0, **overrides}


def traffic() -> None:
    common = _cifar(**{"model": "vgg16-fc4096", "num-server-rounds": 2, "public-size": 5000, "test-size": 200,
                       "max-client-examples": 16, "batch-size": 16,
                       # Distillation epochs change compute, not one byte on the wire: skip them here.
                       "client-distill-epochs": 0, "server-distill-epochs": 0})
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for strategy in ("fedavg", "reft"):
            start = time.perf_counter()
            res = run_inprocess({**common, "strategy": strategy, "output-dir": out, "run-name": strategy}, 10)
            rows[strategy] = (res["rounds"][1], time.perf_counter() - start)
    print("vgg16-fc4096 on CIFAR-10, 10 clients (default device mix), public slice 5000, fp32; round 2 "
          "(after setup). Bytes are the serialized message contents (distillation epochs set to 0: they "
          "change compute, not traffic).")
    print(f"{'strategy':8s} {'down MB':>10s} {'up MB':>10s} {'total MB':>10s} {'down weights':>13s} "
          f"{'down logits':>12s} {'up logits':>10s}")
    for s, (r, _) in rows.items():
        print(f"{s:8s} {r['bytes_down'] / 1e6:10.2f} {r['bytes_up'] / 1e6:10.2f} "
              f"{(r['bytes_down'] + r['bytes_up']) / 1e6:10.2f} {r['bytes_down_weights'] / 1e6:13.2f} "
              f"{r['bytes_down_logits'] / 1e6:12.2f} {r['bytes_up_logits'] / 1e6:10.2f}")
    f, r = rows["fedavg"][0], rows["reft"][0]
    print(f"FedAvg / REFT: down {f['bytes_down'] / r['bytes_down']:.0f}x, up {f['bytes_up'] / r['bytes_up']:.0f}x, "
          f"total {(f['bytes_down'] + f['bytes_up']) / (r['bytes_down'] + r['bytes_up']):.0f}x")


def accuracy(rounds: int, examples: int, model: str) -> None:
    common = _cifar(**{"model": model, "num-server-rounds": rounds, "max-client-examples": examples,
                       "public-size": 1000, "test-size": 2000, "batch-size": 32, "lr": 0.05, "augment": True,
                       "compute-slack": 1.0, "block-round-cap": 2})
    print(f"{model} on CIFAR-10: 10 clients (default device mix) x {examples} private images (iid), "
          f"{rounds} rounds, 1 local epoch, public slice 1000, a random 2000 of the test images, seed 0, fp32, "
          f"compute-slack 1.0, profl block-round-cap 2")
    print(f"{'strategy':12s} {'final acc':>9s} {'best acc':>8s} {'clients':>7s} {'MB down':>9s} {'MB up':>9s} "
          f"{'device s':>9s} {'wall s':>7s}")
    print("(runs kept in benchmarks/results/runs/; figures: python -m fl_app.report benchmarks/results/runs/* "
          "--out benchmarks/results/report)")
    out = REPO / "benchmarks" / "results" / "runs"  # kept: `python -m fl_app.report` builds the figures
    for strategy in ("fedavg", "exclusivefl", "allsmall", "heterofl", "reft", "profl"):
        start = time.perf_counter()
        res = run_inprocess({**common, "strategy": strategy, "output-dir": str(out), "run-name": strategy}, 10)
        s = res["summary"]
        print(f"{strategy:12s} {s['final_accuracy']:9.4f} {s['best_accuracy']:8.4f} "
              f"{s['distinct_participants']:7d} {s['total_bytes_down'] / 1e6:9.2f} {s['total_bytes_up'] / 1e6:9.2f} "
              f"{s['emulated_time_s']:9.1f} {time.perf_counter() - start:7.0f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["sizes", "bytes", "accuracy"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--model", default="cnn")
    args = parser.parse_args()
    print(f"$ python benchmarks/reft.py {' '.join(sys.argv[1:])}")
    {"sizes": sizes, "bytes": traffic, "accuracy": lambda: accuracy(args.rounds, args.examples, args.model)}[args.part]()
