#!/usr/bin/env python
"""Foundation benchmark: client training throughput, achieved GFLOPS, and the cost model's peak memory.

    python benchmarks/foundation.py            # full run, a few minutes on a 2-core machine
    python benchmarks/foundation.py --quick    # smoke run, under a minute

Every figure is measured in the run that prints it:

1. images/s of the app's local-training path (`fl_app.training.train` over `Batches`) against
   a bare PyTorch loop on the same model, init and (pre-normalized) batches;
2. the achieved GFLOPS of that path (cost model FLOPs x images/s) against this machine's
   measured matmul and conv GFLOPS (`fl_app.measure`);
3. the cost model's predicted peak training memory against `measure_step` on a real step,
   with the prediction's terms and a measured counterpart for each.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fl_app.cost import model_cost  # noqa: E402
from fl_app.data import Batches, Dataset, make_synthetic  # noqa: E402
from fl_app.measure import cpu_model, measure_gflops, measure_matmul_gflops  # noqa: E402
from fl_app.models import ModelSpec, build_model  # noqa: E402
from fl_app.training import TrainConfig, forward, make_optimizer, measure_step, train, train_step  # noqa: E402

MB = 2**20
IMAGE_SHAPE = (3, 32, 32)
BATCH = 64
REPEATS = 3
CFG = TrainConfig(epochs=1, batch_size=BATCH, lr=0.05, momentum=0.9, weight_decay=5e-4, augment=False)
# Steady-state batches timed per repeat (the app path runs one more: its profiled first step).
FULL_N = {"cnn": 60, "resnet18": 10}
QUICK_N = {"cnn": 8, "resnet18": 1}
MEMORY_MODELS = ("resnet18", "vgg16", "vgg16-fc4096")
QUICK_MEMORY_MODELS = ("resnet18",)


def load_str() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def wait_for_quiet(max_load: float, wait_s: float) -> str:
    """Wait (up to `wait_s`) until the 1-minute load average is below `max_load`; say what happened."""
    start = time.monotonic()
    first = load_str()
    while os.getloadavg()[0] >= max_load and time.monotonic() - start < wait_s:
        time.sleep(5)
    waited = time.monotonic() - start
    now = os.getloadavg()[0]
    verdict = "below" if now < max_load else "STILL ABOVE (figures may be disturbed)"
    return (f"load average (1/5/15 min) at start {first}; after waiting {waited:.0f} s: {load_str()} "
            f"-> 1-min {verdict} the {max_load:g} threshold")


# --- models and data ----------------------------------------------------------------------------


def initial_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return copy.deepcopy(build_model(ModelSpec(name)).state_dict())


def fresh_model(name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new model with the given (identical every time) initial weights."""
    model = build_model(ModelSpec(name))
    model.load_state_dict(state)
    return model


def batches(ds: Dataset, n_batches: int) -> Batches:
    """The first `n_batches` x 64 training images, unshuffled (so a 1-batch run sees the same first batch)."""
    n = n_batches * BATCH
    return Batches(ds.x_train[:n], ds.y_train[:n], ds, BATCH, shuffle=False)


# --- section 1: throughput ------------------------------------------------------------------------


def time_app(name: str, state: dict, ds: Dataset, n_batches: int) -> tuple[float, float]:
    """Wall seconds of `fl_app.training.train` on a fresh model over `n_batches`, and its mean loss."""
    model = fresh_model(name, state)
    data = batches(ds, n_batches)
    gc.collect()
    start = time.perf_counter()
    result = train(model, data, CFG)
    return time.perf_counter() - start, result.loss


def time_bare(name: str, state: dict, premade: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[float, float, float]:
    """(seconds of the first step, seconds of all steps, mean loss) of a plain PyTorch loop."""
    model = fresh_model(name, state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=CFG.lr, momentum=CFG.momentum, weight_decay=CFG.weight_decay)
    losses = []
    gc.collect()
    start = time.perf_counter()
    first = 0.0
    for x, y in premade:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not first:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start, sum(losses) / len(losses)


def time_normalize(ds: Dataset, n_batches: int) -> float:
    """Seconds `Batches.epoch` alone takes to index and normalize `n_batches` uint8 batches."""
    data = batches(ds, n_batches)
    start = time.perf_counter()
    for _ in data.epoch(0, augment=False):
        pass
    return time.perf_counter() - start


def throughput(name: str, ds: Dataset, n: int, warmup: int) -> dict:
    state = initial_state(name)
    premade = list(batches(ds, n + 1).epoch(0, augment=False))  # identical tensors to what train() gets
    # Warm-up: thread pools, oneDNN primitives, allocator, profiler start-up.
    time_app(name, state, ds, warmup)
    time_bare(name, state, premade[:warmup])
    app1, appn, bare_first, bare_all, bare_steady, norm, diffs = [], [], [], [], [], [], []
    app_loss = bare_loss = float("nan")
    for _ in range(REPEATS):  # interleaved: app, bare, app, bare, ...
        t1, _ = time_app(name, state, ds, 1)
        tn, app_loss = time_app(name, state, ds, n + 1)
        first, total, bare_loss = time_bare(name, state, premade)
        app1.append(t1)
        appn.append(tn)
        diffs.append(tn - t1)
        bare_first.append(first)
        bare_all.append(total)
        bare_steady.append(total - first)
        norm.append(time_normalize(ds, n + 1))
    med = statistics.median
    return {
        "n": n,
        "app_first_s": med(app1),
        "app_all_ips": (n + 1) * BATCH / med(appn),
        "app_steady_ips": n * BATCH / med(diffs),
        "bare_first_s": med(bare_first),
        "bare_all_ips": (n + 1) * BATCH / med(bare_all),
        "bare_steady_ips": n * BATCH / med(bare_steady),
        "norm_ms_per_batch": 1e3 * med(norm) / (n + 1),
        "app_steady_spread": (min(diffs), max(diffs)),
        "bare_steady_spread": (min(bare_steady), max(bare_steady)),
        "app_loss": app_loss,
        "bare_loss": bare_loss,
    }


# --- section 3: memory diagnostics ------------------------------------------------------------------


def phase_peaks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    """(bytes alive before, peak during zero_grad/forward/backward, peak during optimizer.step)
    of one first `train_step`, read from the same profiler allocator events `measure_step` uses;
    the step is split at torch's own "Optimizer.step#SGD.step" record_function range."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = make_optimizer(model, CFG)
    before = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    before += x.numel() * x.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, optimizer, x, y)
    events = list(prof.profiler.kineto_results.events())
    step = next(e for e in events if e.name().startswith("Optimizer.step#"))
    s0, s1 = step.start_ns(), step.start_ns() + step.duration_ns()
    current = fb = opt = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        current += e.nbytes()
        if e.start_ns() < s0:
            fb = max(fb, current)
        elif e.start_ns() <= s1:
            opt = max(opt, current)
    return before, before + fb, before + opt


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a real forward at this batch."""
    model.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(model, x)
    return sum(storages.values())


def memory(name: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    spec = ModelSpec(name)
    cost = model_cost(spec, IMAGE_SHAPE)
    predicted = cost.peak_train_bytes(BATCH, IMAGE_SHAPE)
    state = initial_state(name)
    model = fresh_model(name, state)
    _, measured = measure_step(model, make_optimizer(model, TrainConfig()), x, y)
    grads = optim = 4 * cost.trainable_params
    acts = cost.activation_bytes_per_sample * BATCH
    batch = 4 * BATCH * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    before, fb, opt = phase_peaks(fresh_model(name, state), x, y)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {
        "name": name, "params": cost.params, "predicted": predicted, "measured": measured,
        "state": cost.state_bytes, "grads": grads, "optim": optim, "acts": acts, "batch": batch,
        "pred_fb": cost.state_bytes + batch + acts + grads, "pred_opt": cost.state_bytes + batch + grads + optim,
        "before": before, "meas_fb": fb, "meas_opt": opt, "largest_param": largest,
        "saved_real": saved_activation_bytes(fresh_model(name, state), x),
    }


# --- report -------------------------------------------------------------------------------------------


def mb(b: float) -> str:
    return f"{b / MB:8.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, one memory model: a smoke run (< 60 s)")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="wait for the 1-minute load average to drop below this first (default 1.5)")
    parser.add_argument("--wait", type=float, default=None,
                        help="seconds to wait at most for a quiet machine (default 180, 0 with --quick)")
    args = parser.parse_args()
    n_by_model = QUICK_N if args.quick else FULL_N
    memory_models = QUICK_MEMORY_MODELS if args.quick else MEMORY_MODELS
    wait_s = args.wait if args.wait is not None else (0.0 if args.quick else 180.0)
    gauge_s, gauge_repeats = (1.0, 3) if args.quick else (3.0, 5)
    warmup = 1 if args.quick else 2  # warm-up batches per path and model

    t_start = time.perf_counter()
    print("=== fl_app foundation benchmark ===")
    print(f"date:     {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"command:  {shlex.join(['python', *sys.argv])}   (from {ROOT})")
    print(f"torch:    {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"os.cpu_count() = {os.cpu_count()}")
    print(f"cpu:      {cpu_model()}")
    print(f"machine:  {wait_for_quiet(args.max_load, wait_s)}")
    print(f"mode:     {'QUICK (smoke run: small N, numbers are noisy)' if args.quick else 'full'}; "
          f"every figure below is measured in this run")
    print()

    # ---- 1 ----
    n_max = max(n_by_model.values())
    ds = make_synthetic(train_size=(n_max + 1) * BATCH, test_size=BATCH, shape=IMAGE_SHAPE, seed=0)
    print(f"1. Local-training throughput: app path vs bare PyTorch loop "
          f"(synthetic {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]}, batch {BATCH}, "
          f"SGD lr {CFG.lr} momentum {CFG.momentum} wd {CFG.weight_decay}, augment {CFG.augment})")
    print("   app  = fl_app.training.train(model, Batches(uint8 data), TrainConfig): normalizes each uint8")
    print("          batch on the fly (Batches.epoch) and profiles its first step for peak memory (measure_step);")
    print("          steady state = [train over N+1 batches] - [train over 1 batch], i.e. the first step excluded.")
    print("   bare = for x, y in pre-made normalized float batches: opt.zero_grad(); "
          "loss = F.cross_entropy(model(x), y);")
    print("          loss.backward(); opt.step()  -- it does NOT pay for normalization, the app path does.")
    print(f"   Same initial weights and batches for both; a {warmup}-batch warm-up run of each; "
          f"median of {REPEATS} interleaved repeats.")
    tp = {}
    for name in n_by_model:
        t0 = time.perf_counter()
        tp[name] = throughput(name, ds, n_by_model[name], warmup)
        tp[name]["elapsed"] = time.perf_counter() - t0
    print()
    print(f"   {'model':<9} {'N':>3} {'app img/s':>10} {'bare img/s':>11} {'app/bare':>9}   "
          f"{'app incl. 1st':>13} {'bare incl. 1st':>14} {'ratio':>6}")
    for name, r in tp.items():
        print(f"   {name:<9} {r['n']:>3} {r['app_steady_ips']:>10.1f} {r['bare_steady_ips']:>11.1f} "
              f"{r['app_steady_ips'] / r['bare_steady_ips']:>8.2f}x   {r['app_all_ips']:>13.1f} "
              f"{r['bare_all_ips']:>14.1f} {r['app_all_ips'] / r['bare_all_ips']:>5.2f}x")
    print()
    for name, r in tp.items():
        steady_ms = 1e3 * BATCH / r["app_steady_ips"]
        print(f"   {name}: app first step (train() on 1 batch, incl. profiler) {1e3 * r['app_first_s']:.0f} ms "
              f"vs steady step {steady_ms:.0f} ms; bare first step {1e3 * r['bare_first_s']:.0f} ms; "
              f"Batches normalization alone {r['norm_ms_per_batch']:.2f} ms/batch "
              f"({100 * r['norm_ms_per_batch'] / steady_ms:.1f}% of an app step)")
        a_lo, a_hi = r["app_steady_spread"]
        b_lo, b_hi = r["bare_steady_spread"]
        print(f"      steady-state seconds over the {REPEATS} repeats: app {a_lo:.2f}..{a_hi:.2f}, "
              f"bare {b_lo:.2f}..{b_hi:.2f}; mean loss app {r['app_loss']:.4f} / bare {r['bare_loss']:.4f} "
              f"(same work: these should match); section took {r['elapsed']:.0f} s")
    print(f"   load average after section 1: {load_str()}")
    print()

    # ---- 2 ----
    print("2. Achieved GFLOPS of the app path (steady state) vs this machine's measured GFLOPS")
    print("   achieved = model_cost(spec, (3,32,32)).train_flops_per_sample x app img/s / 1e9")
    print("   (cost-model FLOPs count matmuls/convolutions only, 2 per multiply-accumulate; BatchNorm, ReLU,")
    print("   pooling, the loss and the optimizer update are work the figure does not credit)")
    matmul = measure_matmul_gflops(gauge_s, gauge_repeats)
    conv, conv_source = measure_gflops(gauge_s, gauge_repeats)
    print(f"   measure_matmul_gflops({gauge_s:g}, {gauge_repeats}) = {matmul:.1f} GFLOPS (512x512 fp32 matmul)")
    print(f"   measure_gflops({gauge_s:g}, {gauge_repeats})        = {conv:.1f} GFLOPS (conv2d fwd+bwd); its source:")
    print(f"     {conv_source}")
    print()
    print(f"   {'model':<9} {'GFLOP/img':>9} {'app GFLOPS':>10} {'/matmul':>8} {'/conv':>7}   "
          f"{'bare GFLOPS':>11} {'/matmul':>8}")
    for name, r in tp.items():
        per_img = model_cost(ModelSpec(name), IMAGE_SHAPE).train_flops_per_sample
        app_g, bare_g = per_img * r["app_steady_ips"] / 1e9, per_img * r["bare_steady_ips"] / 1e9
        print(f"   {name:<9} {per_img / 1e9:>9.3f} {app_g:>10.1f} {app_g / matmul:>7.0%} {app_g / conv:>7.0%}   "
              f"{bare_g:>11.1f} {bare_g / matmul:>7.0%}")
    print(f"   load average after section 2: {load_str()}")
    print()

    # ---- 3 ----
    print(f"3. Cost model: predicted vs measured peak training memory, batch {BATCH} on 3x32x32, MB = 2^20 bytes")
    print("   predicted = model_cost(spec, (3,32,32)).peak_train_bytes(64, (3,32,32))")
    print("             = params+buffers + batch + max(activations + grads, grads + optimizer state)")
    print("   measured  = measure_step(fresh model, make_optimizer(model, TrainConfig()), x, y): the first step,")
    print("               so it creates the gradients and the momentum buffers")
    first = next(iter(batches(ds, 1).epoch(0)))
    x, y = first
    rows = []
    for name in memory_models:
        t0 = time.perf_counter()
        r = memory(name, x, y)
        r["elapsed"] = time.perf_counter() - t0
        rows.append(r)
    print()
    print(f"   {'model':<13} {'params':>10} {'predicted':>9} {'measured':>9} {'pred/meas':>9}")
    for r in rows:
        print(f"   {r['name']:<13} {r['params']:>10,} {mb(r['predicted'])} {mb(r['measured'])} "
              f"{r['predicted'] / r['measured']:>9.3f}")
    print()
    print("   breakdown of the prediction (MB):")
    print(f"   {'model':<13} {'params+buf':>10} {'grads':>8} {'optim':>8} {'acts@64':>8} {'batch':>8}  "
          f"{'fwd/bwd term':>12} {'optim term':>10}")
    for r in rows:
        print(f"   {r['name']:<13} {mb(r['state']):>10} {mb(r['grads'])} {mb(r['optim'])} {mb(r['acts'])} "
              f"{mb(r['batch'])}  {mb(r['pred_fb']):>12} {mb(r['pred_opt']):>10}")
    print()
    print("   measured counterparts (MB): the same first step profiled again and split at the optimizer step;")
    print("   'saved acts' = distinct non-parameter storages autograd saves in a real forward at batch 64")
    print(f"   {'model':<13} {'alive before':>12} {'saved acts':>10} {'fwd/bwd peak':>12} {'optim peak':>10}  "
          f"{'largest param':>13}")
    for r in rows:
        print(f"   {r['name']:<13} {mb(r['before']):>12} {mb(r['saved_real']):>10} {mb(r['meas_fb']):>12} "
              f"{mb(r['meas_opt']):>10}  {mb(r['largest_param']):>13}   ({r['elapsed']:.0f} s)")
    print()
    for r in rows:
        winner = "optimizer step" if r["meas_opt"] > r["meas_fb"] else "forward/backward"
        pred_winner = "optimizer" if r["pred_opt"] > r["pred_fb"] else "fwd/bwd"
        print(f"   {r['name']}: measured peak is in the {winner} (predicted: {pred_winner} term); "
              f"optim peak - (alive before + grads + momentum) = "
              f"{(r['meas_opt'] - r['before'] - r['grads'] - r['optim']) / MB:.1f} MB "
              f"(largest param {r['largest_param'] / MB:.1f} MB); fwd/bwd peak - (alive before + acts) = "
              f"{(r['meas_fb'] - r['before'] - r['acts']) / MB:.1f} MB (predicted grads {r['grads'] / MB:.1f} MB)")
    print(f"   load average at the end: {load_str()}; total run time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
