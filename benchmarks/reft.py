"""REFT figures: submodel sizes per device, traffic per round vs FedAvg, accuracy vs the baselines.

    python benchmarks/reft.py sizes      # VGG-16 (4096 classifier) submodels: global vs uniform pruning
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_inprocess import REPO, run_inprocess  # noqa: E402
from fl_app.config import RunConfig  # noqa: E402
from fl_app.data import make_synthetic  # noqa: E402
from fl_app.profiles import load_profile, parse_device_mix  # noqa: E402
from fl_app.cost import model_cost  # noqa: E402
from fl_app.models import ModelSpec, build_model  # noqa: E402
from fl_app.width import PRUNING, fit_ratio, pruning_widths  # noqa: E402
from server_app.strategies.base import Device, Federation  # noqa: E402
from server_app.strategies.reft import REFT  # noqa: E402

DATA = str(REPO.parent / "shared" / "data")
MB = 2**20


def sizes() -> None:
    """REFT's VGG-16 case, pruned globally and uniformly: at the paper's budget (0.07/0.33 of the full
    model's FLOPs), then per device of the default mix under an emulated deadline."""
    spec, shape = ModelSpec("vgg16-fc4096"), (3, 32, 32)
    full = model_cost(spec, shape)
    torch.manual_seed(0)
    model = build_model(spec)
    print(f"vgg16-fc4096, 3x32x32: {full.state_bytes / 1e6:.1f} MB (10^6 bytes), "
          f"{full.forward_macs_per_sample / 1e9:.3f} G MACs/image; paper's REFT submodel: 1.8 MB, 0.07 G MACs")
    print("\n1. Budget 0.07/0.33 of the full model's training FLOPs per sample (weights at initialisation, seed 0; "
          "global: channels costed in parameters)")
    print(f"{'pruning':8s} {'level':>6s} {'MB':>7s} {'G MACs':>7s}  widths")
    for name in PRUNING:
        widths_at = pruning_widths(model, name, 0.05, shape, 32, "parameters")
        level = fit_ratio(spec, shape, lambda c: c.train_flops_per_sample <= full.train_flops_per_sample * 0.07 / 0.33,
                          0.0 if name == "global" else 0.05, widths_at)
        cost = model_cost(spec.with_widths(widths_at(level)), shape)
        widths = widths_at(level)
        print(f"{name:8s} {level:6.3f} {cost.state_bytes / 1e6:7.2f} {cost.forward_macs_per_sample / 1e9:7.4f}  "
              + " ".join(f"{g.replace('stage', 's').replace('.conv', 'c')}:{w}" for g, w in widths.items()))
    deadline = 60.0
    print(f"\n2. The default device mix, 500 examples each, emulated-deadline {deadline:g} s (REFT's refresh round: "
          "weights and soft labels down, logits up, public slice 500, fp32)")
    print(f"{'profile':22s} {'pruning':8s} {'level':>6s} {'MB':>8s} {'G MACs':>7s} {'device s':>9s} {'peak MB':>8s}")
    for name in PRUNING:
        config = RunConfig.from_mapping({"model": "vgg16-fc4096", "strategy": "reft", "pruning": name,
                                         "emulated-deadline": deadline})
        names = parse_device_mix(config.device_mix)
        devices = [Device(i + 1, i, load_profile(n), 500) for i, n in enumerate(names)]
        fed = Federation(config, devices, make_synthetic(train_size=10, test_size=2), np.random.default_rng(0))
        strategy = REFT(fed)
        seen = set()
        for d in devices:
            if d.profile.name in seen:
                continue
            seen.add(d.profile.name)
            if d.node_id not in strategy.ratios:
                print(f"{d.profile.name:22s} {name:8s} left out: {strategy.left_out[d.node_id]}")
                continue
            level = strategy.ratios[d.node_id]
            cost = fed.cost(spec.with_widths(strategy.levels_for(d)(level)))
            print(f"{d.profile.name:22s} {name:8s} {level:6.3f} {cost.state_bytes / 1e6:8.2f} "
                  f"{cost.forward_macs_per_sample / 1e9:7.4f} {strategy.workload(d).device_time_s(d.profile, cost):9.1f} "
                  f"{fed.peak_memory_mb(cost):8.1f}")


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
                       "public-size": 1000, "test-size": 2000, "batch-size": 32, "lr": 0.05, "augment": True})
    print(f"{model} on CIFAR-10: 10 clients (default device mix) x {examples} private images (iid), "
          f"{rounds} rounds, 1 local epoch, public slice 1000, a random 2000 of the test images, seed 0, fp32")
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
