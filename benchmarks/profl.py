"""ProFL figures: measured peak memory of every step vs full training; who can take part.

    python benchmarks/profl.py memory          # ResNet-18 and VGG-16, CIFAR-10 shapes, batch 64
    python benchmarks/profl.py memory --models resnet18 --device cuda   # the same on a GPU
    python benchmarks/profl.py participation   # memory-constrained device mix: ProFL vs ExclusiveFL
    python benchmarks/profl.py accuracy        # same mix, real CIFAR-10: participation and accuracy of
                                               # fedavg, exclusivefl, allsmall, heterofl, profl

Memory is measured on a real training step (PyTorch profiler allocator events: what was alive
before the step plus the highest point of what it allocated), next to the cost model's prediction.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_inprocess import REPO, run_inprocess  # noqa: E402
from fl_app.config import RunConfig  # noqa: E402
from fl_app.cost import model_cost  # noqa: E402
from fl_app.data import federated_split, load_dataset, make_synthetic  # noqa: E402
from fl_app.models import ModelSpec, build_model, num_blocks  # noqa: E402
from fl_app.profiles import load_profile, parse_device_mix  # noqa: E402
from fl_app.training import TrainConfig, freeze_except, make_optimizer, measure_step  # noqa: E402
from server_app.server_app import _test_batches  # noqa: E402
from server_app.strategies.base import Device, Federation  # noqa: E402
from server_app.strategies.profl import Step  # noqa: E402

MB = 2**20
SHAPE = (3, 32, 32)
DATA = str(REPO.parent / "shared" / "data")
STRATEGIES = ("fedavg", "exclusivefl", "allsmall", "heterofl", "profl")


def measured_peak(spec: ModelSpec, trainable: list[int] | None, batch: int, checkpoint: bool,
                  teacher: ModelSpec | None = None, device: str = "cpu") -> float:
    """Peak memory (MB) of one real training step on `device` (on CUDA: torch.cuda.max_memory_allocated)."""
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    freeze_except(model, trainable)
    optimizer = make_optimizer(model, TrainConfig())
    x, y = torch.randn(batch, *SHAPE, device=device), torch.randint(0, 10, (batch,), device=device)
    target, loss_fn = y, torch.nn.functional.cross_entropy
    extra = 0
    if teacher is not None:  # the mimic step holds its teacher too, and regresses on its logits
        t = build_model(teacher).to(device).eval()
        extra = sum(v.numel() * v.element_size() for v in t.state_dict().values())
        with torch.no_grad():
            target = t(x)
        loss_fn = torch.nn.functional.mse_loss
    _, peak = measure_step(model, optimizer, x, target, trainable, loss_fn, checkpoint)
    return (peak + extra) / MB


def steps(total: int) -> list[Step]:
    shrink = [Step("shrink", t, k) for t in range(total, 1, -1) for k in ("train", "mimic")]
    grow = [Step("grow", t, "train") for t in range(1, total + 1)]
    return shrink + grow


def memory(batch: int, models: list[str], device: str = "cpu") -> None:
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "this CPU"
    print(f"batch {batch}, inputs 3x32x32, SGD momentum; MB = 2^20 bytes; measured = a real step on {where}")
    for name in models:
        full = ModelSpec(name)
        full_measured = measured_peak(full, None, batch, False, device=device)
        full_predicted = model_cost(full, SHAPE).peak_train_bytes(batch, SHAPE) / MB
        print(f"\n{name}: full-model training {full_measured:.1f} MB measured, {full_predicted:.1f} MB predicted")
        print(f"{'step':18s} {'trains':>8s} {'measured':>9s} {'vs full':>8s} {'predicted':>9s} "
              f"{'ckpt meas':>9s} {'vs full':>8s} {'ckpt pred':>9s}")
        worst = {False: 0.0, True: 0.0}
        total = num_blocks(name)
        for step in steps(total):
            spec = full.with_depth(step.depth)
            trainable = step.trainable(total)
            teacher = full.with_depth(step.block) if step.kind == "mimic" else None
            row = []
            for ckpt in (False, True):
                m = measured_peak(spec, trainable, batch, ckpt, teacher, device)
                p = (model_cost(spec, SHAPE, trainable, ckpt).peak_train_bytes(batch, SHAPE)
                     + (model_cost(teacher, SHAPE).state_bytes if teacher else 0)) / MB
                worst[ckpt] = max(worst[ckpt], m)
                row += [m, 1 - m / full_measured, p]
            print(f"{step.stage + ' ' + step.kind + ' ' + str(step.block):18s} {str(trainable):>8s} "
                  f"{row[0]:9.1f} {-100 * row[1]:7.1f}% {row[2]:9.1f} {row[3]:9.1f} {-100 * row[4]:7.1f}% {row[5]:9.1f}",
                  flush=True)
        for ckpt, label in ((False, "without"), (True, "with")):
            print(f"largest step {label} checkpointing: {worst[ckpt]:.1f} MB = "
                  f"{100 * (1 - worst[ckpt] / full_measured):.1f}% below full training")


def participation(batch: int, model: str, mix: str) -> None:
    config = RunConfig.from_mapping({"model": model, "strategy": "profl", "batch-size": batch, "device-mix": mix})
    devices = [Device(i + 1, i, load_profile(n), 0) for i, n in enumerate(parse_device_mix(mix))]
    fed = Federation(config, devices, make_synthetic(train_size=10, test_size=2), np.random.default_rng(0))
    full = fed.cost(fed.full_spec())
    exclusive = [d for d in devices if fed.peak_memory_mb(full) <= d.profile.memory_mb]
    print(f"{model}, batch {batch}, device mix {mix}: full training needs {fed.peak_memory_mb(full):.0f} MB; "
          f"ExclusiveFL can use {len(exclusive)}/{len(devices)} devices every round")
    for ckpt in (False, True):
        cfg = RunConfig.from_mapping({**{"model": model, "strategy": "profl", "batch-size": batch,
                                         "device-mix": mix, "checkpoint": ckpt}})
        fed = Federation(cfg, devices, fed.dataset, np.random.default_rng(0))
        print(f"ProFL{' + checkpointing' if ckpt else ''}:")
        total = num_blocks(model)
        for step in steps(total):
            from fl_app.job import Job

            job = Job(round=0, model=fed.full_spec().with_depth(step.depth(total)), train=fed.train_config(),
                      trainable=step.trainable(total),
                      mimic=fed.full_spec().with_depth(step.block) if step.kind == "mimic" else None)
            need = fed.job_peak_memory_mb(job)
            eligible = sum(need <= d.profile.memory_mb for d in devices)
            print(f"  {step.stage} {step.kind} {step.block}: needs {need:6.0f} MB, {eligible}/{len(devices)} devices fit")


def _data_check(config: dict, num_nodes: int) -> str:
    """Class balance of what the runs actually use: the CIFAR-10 arrays are stored sorted by class."""
    cfg = RunConfig.from_mapping(config)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed)
    split = federated_split(data, num_nodes, cfg.partition, cfg.seed, cfg.dirichlet_alpha, cfg.shards_per_client,
                            cfg.public_size, cfg.max_client_examples)
    classes = data.num_classes
    counts = np.stack([np.bincount(data.y_train[torch.from_numpy(c)].numpy(), minlength=classes)
                       for c in split.clients])
    test = np.bincount(_test_batches(data, cfg).y.numpy(), minlength=classes)
    return (f"data check: {len(split.clients)} clients x {sorted({len(c) for c in split.clients})} private images, "
            f"images per class per client min {counts.min()} max {counts.max()} (every client has "
            f"{(counts > 0).sum(1).min()}+ of {classes} classes); server test images per class min {test.min()} "
            f"max {test.max()} of {test.sum()}")


def _code_version() -> str:
    """The commit the runs used, and any uncommitted changes to the code they import."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip()
    if not head:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "fl_app", "server_app", "client_app", "tests", "benchmarks")
    changed = sorted(line[3:] for line in dirty.splitlines() if line.strip())
    return f"git {head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def _test_subset_npz(folder: Path, test_size: int, seed: int) -> str:
    """Real CIFAR-10 with its test set replaced by the seeded subset the server would draw for `test-size`.

    The training arrays are the same (same partitions, same normalization), and the server evaluates
    exactly the images `dataset=cifar10 test-size=N` would give it. What changes: a client's own test
    share (1/num-nodes of the test set; HeteroFL clients evaluate their submodel on it every round) comes
    from these N images instead of all 10000, which would cost more than every other run together here.
    """
    data = load_dataset("cifar10", DATA, seed)
    test = _test_batches(data, RunConfig.from_mapping({"dataset": "cifar10", "data-dir": DATA, "seed": seed,
                                                       "test-size": test_size}))
    path = folder / f"cifar10_test{test_size}_seed{seed}.npz"
    np.savez(path, x_train=data.x_train.numpy(), y_train=data.y_train.numpy(), x_test=test.x.numpy(),
             y_test=test.y.numpy())
    return f"npz:{path}"


def accuracy(args: argparse.Namespace) -> None:
    """Every strategy on the same devices, data, seed and rounds; runs kept for `python -m fl_app.report`."""
    num_nodes = len(parse_device_mix(args.mix)) if args.nodes is None else args.nodes
    with tempfile.TemporaryDirectory() as tmp:
        if args.full_test_on_clients:
            data = {"dataset": "cifar10", "data-dir": DATA, "test-size": args.test}
        else:
            data = {"dataset": _test_subset_npz(Path(tmp), args.test, args.seed), "test-size": 0}
        _accuracy(args, num_nodes, data)


def _accuracy(args: argparse.Namespace, num_nodes: int, data: dict) -> None:
    common = {**data, "seed": args.seed, "model": args.model, "batch-size": args.batch, "device-mix": args.mix,
              "partition": "iid", "num-server-rounds": args.rounds, "max-client-examples": args.examples,
              "local-epochs": args.epochs, "public-size": args.public, "lr": args.lr, "augment": True,
              # Memory is the only constraint here (no emulated-deadline).
              "profl-shrink-share": args.shrink_share, "block-round-cap": args.cap, "em-window": args.em_window,
              "em-threshold": args.em_threshold, "em-patience": args.em_patience}
    total = num_blocks(args.model)
    print(f"code: {_code_version()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.model} on real CIFAR-10 ({DATA}/cifar10), {num_nodes} clients, device mix {args.mix}, "
          f"batch {args.batch}, fp32, seed {args.seed}")
    print(f"scale: {args.examples} private images per client (iid over shuffled indices, then a seeded cap), "
          f"{args.rounds} rounds, {args.epochs} local epoch(s), lr {args.lr}, augmentation on; a seeded random "
          f"{args.test} of the 10000 test images "
          + ("(server: test-size; clients' own test shares from all 10000)" if args.full_test_on_clients else
             "(server and, for HeteroFL's per-client check, the clients: the test set is replaced by that subset, "
             "so each client's test share is 1/%d of it)" % num_nodes)
          + f"; public slice {args.public} held out of training (unused by these strategies)")
    print("devices: memory is the only constraint (no emulated-deadline); fedavg ignores memory budgets, the "
          "others enforce them")
    print(f"profl: {total} blocks; profl-shrink-share {args.shrink_share} of the rounds, then grow with "
          f"block-round-cap {args.cap}, em-window {args.em_window}, em-threshold {args.em_threshold}, "
          f"em-patience {args.em_patience}")
    print(_data_check({**common, "strategy": "fedavg"}, num_nodes))
    print("(runs kept in benchmarks/results/runs_profl/<strategy>; figures: python -m fl_app.report "
          "benchmarks/results/runs_profl/* --out benchmarks/results/report_profl)")
    print(f"{'strategy':12s} {'final acc':>9s} {'best acc':>8s} {'clients':>7s} {'share':>5s} {'mean/rnd':>8s} "
          f"{'MB down':>9s} {'MB up':>9s} {'device s':>9s} {'wall s':>7s}", flush=True)
    out = REPO / "benchmarks" / "results" / "runs_profl"
    notes = []
    begin = time.perf_counter()
    for strategy in args.strategies.split(","):
        start = time.perf_counter()
        res = run_inprocess({**common, "strategy": strategy, "output-dir": str(out), "run-name": strategy},
                            num_nodes)
        wall = time.perf_counter() - start
        (out / strategy / "checkpoint.pt").unlink(missing_ok=True)  # resume state (tens of MB): not a result
        s, rounds = res["summary"], res["rounds"]
        mean = sum(r["participants"] for r in rounds) / len(rounds)
        print(f"{strategy:12s} {s['final_accuracy']:9.4f} {s['best_accuracy']:8.4f} "
              f"{s['distinct_participants']:4d}/{num_nodes:<2d} {s['distinct_participants'] / num_nodes:5.2f} "
              f"{mean:8.2f} {s['total_bytes_down'] / 1e6:9.2f} {s['total_bytes_up'] / 1e6:9.2f} "
              f"{s['emulated_time_s']:9.1f} {wall:7.0f}", flush=True)
        by_round = " ".join(f"{r['accuracy']:.3f}" for r in rounds)
        notes.append(f"{strategy}: status {res['status']}, {len(rounds)} rounds, {s['client_failures']} client "
                     f"failures; accuracy by round {by_round}")
        if strategy == "profl":
            steps_run = [f"{r['round']}:{r['stage'][0]}{r['step'][0]}{r['active_block']}"
                         + ("*" if r.get("frozen") else "") for r in rounds]
            grown = [r["active_block"] for r in rounds if r["stage"] == "grow"]
            notes.append(f"profl schedule (round:stage step block; s/g = shrink/grow, t/m = train/mimic, "
                         f"* = block frozen after the round): {' '.join(steps_run)}")
            notes.append(f"profl: the grow stage reached block {max(grown) if grown else 'none'} of {total}; the "
                         f"last round trained {rounds[-1]['stage']} block {rounds[-1]['active_block']}; devices "
                         f"eligible per round {sorted({r['eligible'] for r in rounds})}")
        if strategy in ("exclusivefl", "allsmall", "heterofl"):
            left = [c["node_id"] for c in rounds[-1]["clients"] if c["left_out"]]
            ratios = sorted({round(c["keep_ratio"], 3) for r in rounds for c in r["clients"]
                             if c.get("keep_ratio") is not None})
            notes.append(f"{strategy}: left out {len(left)}/{num_nodes} (nodes {left}); keep ratios {ratios}")
        if strategy == "fedavg":
            over = sorted({c["profile"] for c in rounds[-1]["clients"] if c.get("fits_memory") is False})
            count = sum(1 for c in rounds[-1]["clients"] if c.get("fits_memory") is False)
            notes.append(f"fedavg: {count}/{num_nodes} clients ({', '.join(over)}) trained past their memory "
                         f"budget every round (fedavg ignores limits: a real device would fail)")
    print("clients = distinct participants / clients, share = that ratio; mean/rnd = clients that trained per "
          "round, averaged; MB = 10^6 bytes; device s = emulated device time, sum over rounds of the slowest "
          "client; wall s = this machine")
    for note in notes:
        print(note)
    print(f"total wall time {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["memory", "participation", "accuracy"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--mix", default="raspberry-pi-3b-plus:6,jetson-nano:2,laptop:2")
    parser.add_argument("--models", default="resnet18,vgg16", help="memory: comma-separated model names")
    parser.add_argument("--device", default="cpu", help="memory: where the steps are measured, e.g. cuda")
    acc_args = parser.add_argument_group("accuracy")
    acc_args.add_argument("--strategies", default=",".join(STRATEGIES))
    acc_args.add_argument("--nodes", type=int, default=None, help="default: the length of --mix")
    acc_args.add_argument("--rounds", type=int, default=10)
    acc_args.add_argument("--examples", type=int, default=64, help="private images per client")
    acc_args.add_argument("--epochs", type=int, default=1)
    acc_args.add_argument("--public", type=int, default=500)
    acc_args.add_argument("--test", type=int, default=500)
    acc_args.add_argument("--lr", type=float, default=0.05)
    acc_args.add_argument("--seed", type=int, default=0)
    acc_args.add_argument("--shrink-share", type=float, default=0.2, help="profl-shrink-share")
    acc_args.add_argument("--cap", type=int, default=1, help="profl block-round-cap (0: from the rounds left)")
    acc_args.add_argument("--em-window", type=int, default=6)
    acc_args.add_argument("--em-threshold", type=float, default=0.2)
    acc_args.add_argument("--em-patience", type=int, default=2)
    acc_args.add_argument("--full-test-on-clients", action="store_true",
                          help="dataset=cifar10 as is: clients' own test shares come from all 10000 test images")
    args = parser.parse_args()
    print(f"$ python benchmarks/profl.py {' '.join(sys.argv[1:])}")
    if args.part == "memory":
        memory(args.batch, args.models.split(","), args.device)
    elif args.part == "participation":
        participation(args.batch, args.model, args.mix)
    else:
        accuracy(args)
