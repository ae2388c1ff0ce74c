"""ProFL figures: measured peak memory of every step vs full training; who can take part.

    python benchmarks/profl.py memory          # ResNet-18 and VGG-16, CIFAR-10 shapes, batch 64
    python benchmarks/profl.py participation   # memory-constrained device mix: ProFL vs ExclusiveFL

Memory is measured on a real training step (PyTorch profiler allocator events: what was alive
before the step plus the highest point of what it allocated), next to the cost model's prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.config import RunConfig  # noqa: E402
from fl_app.cost import model_cost  # noqa: E402
from fl_app.data import make_synthetic  # noqa: E402
from fl_app.models import ModelSpec, build_model, num_blocks  # noqa: E402
from fl_app.profiles import load_profile, parse_device_mix  # noqa: E402
from fl_app.training import TrainConfig, freeze_except, make_optimizer, measure_step  # noqa: E402
from server_app.strategies.base import Device, Federation  # noqa: E402
from server_app.strategies.profl import Step  # noqa: E402

MB = 2**20
SHAPE = (3, 32, 32)


def measured_peak(spec: ModelSpec, trainable: list[int] | None, batch: int, checkpoint: bool,
                  teacher: ModelSpec | None = None) -> float:
    torch.manual_seed(0)
    model = build_model(spec)
    freeze_except(model, trainable)
    optimizer = make_optimizer(model, TrainConfig())
    x, y = torch.randn(batch, *SHAPE), torch.randint(0, 10, (batch,))
    target, loss_fn = y, torch.nn.functional.cross_entropy
    extra = 0
    if teacher is not None:  # the mimic step holds its teacher too, and regresses on its logits
        t = build_model(teacher).eval()
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


def memory(batch: int, models: list[str]) -> None:
    print(f"batch {batch}, inputs 3x32x32, SGD momentum; MB = 2^20 bytes; measured = a real step on this CPU")
    for name in models:
        full = ModelSpec(name)
        full_measured = measured_peak(full, None, batch, False)
        full_predicted = model_cost(full, SHAPE).peak_train_bytes(batch, SHAPE) / MB
        print(f"\n{name}: full-model training {full_measured:.1f} MB measured, {full_predicted:.1f} MB predicted")
        print(f"{'step':18s} {'trains':>8s} {'measured':>9s} {'vs full':>8s} {'predicted':>9s} "
              f"{'ckpt meas':>9s} {'vs full':>8s} {'ckpt pred':>9s}")
        worst = {False: 0.0, True: 0.0}
        total = num_blocks(name)
        for step in steps(total):
            spec = full.with_depth(step.depth(total))
            trainable = step.trainable(total)
            teacher = full.with_depth(step.block) if step.kind == "mimic" else None
            row = []
            for ckpt in (False, True):
                m = measured_peak(spec, trainable, batch, ckpt, teacher)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["memory", "participation"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--mix", default="raspberry-pi-3b-plus:6,jetson-nano:2,laptop:2")
    parser.add_argument("--models", default="resnet18,vgg16", help="memory: comma-separated model names")
    args = parser.parse_args()
    print(f"$ python benchmarks/profl.py {' '.join(sys.argv[1:])}")
    if args.part == "memory":
        memory(args.batch, args.models.split(","))
    else:
        participation(args.batch, args.model, args.mix)
