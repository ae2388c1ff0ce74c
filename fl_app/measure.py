"""Measure this machine and write its device profile, so profile numbers can be measured, not guessed.

Run it on the real device (a Raspberry Pi, a Jetson, a laptop):

    python -m fl_app.measure --name my-pi --out profiles/my-pi.toml --uplink-mbps 20 --downlink-mbps 50

Compute is the median throughput of a training-like step (a 3x3 convolution, forward and backward)
on the CPU with PyTorch's own thread count, because that is what a client's local training runs;
a plain matmul figure is measured too, as this machine's "best case" reference. FLOPs follow the
cost model's convention (FlopCounterMode: 2 per multiply-accumulate). Memory is a fraction of what
is available now. Bandwidth needs a peer to measure against, so it is taken from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from fl_app import cpu_safety
from fl_app.profiles import DeviceProfile, ProfileError, load_profile
from fl_app.units import MIB

MATMUL_SIZE = 512
# A middle layer of a small CIFAR CNN. Batch 16, not 32, so one step stays near 2 s even on a
# Raspberry Pi 3B+ (about 3.6 GFLOP per step): each timed repeat runs at least one whole step.
CONV_BATCH, CONV_CHANNELS, CONV_HW = 16, 64, 32
DEFAULT_UPLINK_MBPS, DEFAULT_DOWNLINK_MBPS = 20.0, 50.0  # home Wi-Fi class; cannot be measured without a peer


def cpu_model() -> str:
    """The CPU (or board) name: /proc/cpuinfo on Linux, else what `platform` knows."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        info = []
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in info:
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _median_rate(step: Callable[[], object], flops_per_step: float, seconds: float, repeats: int) -> float:
    """Median GFLOPS over `repeats` timed runs of about `seconds / repeats` each (after a warm-up).

    Each run does whole steps and at least one, so a slow device takes longer than `seconds`
    rather than reporting a partial step. The median ignores a run hit by a background task.
    """
    if not (seconds > 0 and math.isfinite(seconds)) or repeats < 1:
        raise ValueError(f"seconds must be positive and repeats >= 1, got {seconds!r}, {repeats!r}")
    for _ in range(2):  # warm-up: thread pools, oneDNN primitives, allocator caches
        step()
    per_run = seconds / repeats
    rates = []
    for _ in range(repeats):
        steps, start = 0, time.perf_counter()
        while True:
            step()
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= per_run:
                break
        rates.append(steps * flops_per_step / elapsed / 1e9)
    return statistics.median(rates)


def measure_matmul_gflops(seconds: float = 3.0, repeats: int = 5) -> float:
    """Median fp32 GFLOPS of a 512x512 matmul on the CPU: the machine's near-peak reference."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    out = torch.empty(MATMUL_SIZE, MATMUL_SIZE)
    with torch.no_grad():
        return _median_rate(lambda: torch.mm(a, b, out=out), 2.0 * MATMUL_SIZE**3, seconds, repeats)


def _conv_step(device: str) -> Callable[[], None]:
    """One training-like step: conv2d forward, then backward for input and weight gradients."""
    conv = torch.nn.Conv2d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1, device=device)
    x = torch.randn(CONV_BATCH, CONV_CHANNELS, CONV_HW, CONV_HW, requires_grad=True, device=device)
    grad_out = torch.randn(CONV_BATCH, CONV_CHANNELS, CONV_HW, CONV_HW, device=device)

    def step() -> None:
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).backward(grad_out)
    return step


def measure_conv_gflops(seconds: float = 3.0, repeats: int = 5) -> float:
    """Median fp32 GFLOPS of a conv2d forward + backward (input and weight gradients) on the CPU."""
    counter = FlopCounterMode(display=False)
    with counter:  # on the meta device: counts the same ops without spending a real step on a slow board
        _conv_step("meta")()
    return _median_rate(_conv_step("cpu"), float(counter.get_total_flops()), seconds, repeats)


def measure_gflops(seconds: float = 3.0, repeats: int = 5) -> tuple[float, str]:
    """Sustained training GFLOPS (conv fwd+bwd median) and a source string saying how it was got.

    The conv and the matmul each get `seconds`, so this takes about 2 x `seconds` plus warm-up.
    """
    cpu_safety.apply()  # one thread on ARMv8.0 cores (Pi 3B+/4), as the ClientApp trains there
    matmul = measure_matmul_gflops(seconds, repeats)
    conv = measure_conv_gflops(seconds, repeats)
    source = (f"measured on {socket.gethostname()} ({cpu_model()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}) on {datetime.date.today().isoformat()} by fl_app.measure: "
              f"conv2d {CONV_CHANNELS}->{CONV_CHANNELS} 3x3 {CONV_HW}x{CONV_HW} batch {CONV_BATCH} fwd+bwd, "
              f"median of {repeats} x {seconds / repeats:.2g} s = {conv:.3g} GFLOPS; "
              f"{MATMUL_SIZE}x{MATMUL_SIZE} matmul median {matmul:.3g} GFLOPS")
    return conv, source


def measure_memory_mb(fraction: float = 0.7) -> tuple[float, str]:
    """`fraction` of the memory available right now, in MiB, with a source string.

    Available (not total) memory, because the OS, other programs and the Python/PyTorch runtime
    already hold the rest; the fraction leaves headroom for the data loader and fragmentation.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction!r}")
    vm = psutil.virtual_memory()
    source = (f"measured on {socket.gethostname()} on {datetime.date.today().isoformat()} by fl_app.measure: "
              f"{fraction:g} x {vm.available / MIB:.0f} MiB available (of {vm.total / MIB:.0f} MiB total) "
              f"per psutil.virtual_memory()")
    return vm.available * fraction / MIB, source


def measure_profile(name: str, uplink_mbps: float, downlink_mbps: float, seconds: float = 3.0,
                    memory_fraction: float = 0.7, repeats: int = 5) -> DeviceProfile:
    """This machine's profile: compute and memory measured, bandwidth as given by the caller."""
    gflops, gflops_src = measure_gflops(seconds, repeats)
    memory_mb, memory_src = measure_memory_mb(memory_fraction)
    total_gib = psutil.virtual_memory().total / 2**30
    return DeviceProfile(
        name=name, gflops=round(gflops, 3), memory_mb=round(memory_mb), uplink_mbps=uplink_mbps,
        downlink_mbps=downlink_mbps,
        description=(f"{cpu_model()}, {total_gib:.1f} GiB RAM ({socket.gethostname()}; CPU, "
                     f"{torch.get_num_threads()} torch threads)"),
        sources={"gflops": gflops_src, "memory_mb": memory_src,
                 "uplink_mbps": "given on the command line (--uplink-mbps), not measured",
                 "downlink_mbps": "given on the command line (--downlink-mbps), not measured"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    """CLI: measure, print the profile TOML, and write it with --out (never overwriting without --force)."""
    parser = _Parser(prog="python -m fl_app.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="profile name (default: the --out file's stem, else the hostname)")
    parser.add_argument("--out", type=Path, help="write the profile here (e.g. profiles/my-pi.toml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    parser.add_argument("--seconds", type=_positive, default=3.0, help="timed seconds for compute (default 3)")
    parser.add_argument("--uplink-mbps", type=_positive,
                        help=f"uplink bandwidth, Mbit/s (default {DEFAULT_UPLINK_MBPS:g}, recorded as assumed)")
    parser.add_argument("--downlink-mbps", type=_positive,
                        help=f"downlink bandwidth, Mbit/s (default {DEFAULT_DOWNLINK_MBPS:g}, recorded as assumed)")
    parser.add_argument("--memory-fraction", type=_positive, default=0.7,
                        help="fraction of available memory a training job may use, in (0, 1] (default 0.7)")
    args = parser.parse_args(argv)

    out: Path | None = args.out
    name = args.name or (out.stem if out else socket.gethostname().split(".")[0].lower())
    if args.memory_fraction > 1:
        parser.error(f"--memory-fraction must be in (0, 1], got {args.memory_fraction:g}")
    if not name or any(c in name for c in '"\\/ '):
        parser.error(f"--name {name!r}: use letters, digits, '-' or '_' (it names the profile)")
    if out is not None:
        if out.suffix != ".toml":
            parser.error(f"--out {out}: a profile file must end in .toml")
        if out.stem != name:
            parser.error(f"--out {out} has stem {out.stem!r} but --name is {name!r}; they must match, "
                         f"because profiles are looked up by file name")
        if out.exists() and not args.force:
            parser.error(f"--out {out} already exists; pass --force to overwrite it")
        if not out.parent.is_dir():
            parser.error(f"--out {out}: folder {out.parent} does not exist")

    try:
        profile = measure_profile(name, args.uplink_mbps or DEFAULT_UPLINK_MBPS,
                                  args.downlink_mbps or DEFAULT_DOWNLINK_MBPS, args.seconds, args.memory_fraction)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"measurement failed: {exc}")
    sources = dict(profile.sources)
    for key, given in (("uplink_mbps", args.uplink_mbps), ("downlink_mbps", args.downlink_mbps)):
        if given is None:  # not given: the record must say it is the CLI's default, an assumption
            sources[key] = (f"assumed: the default of --{key.replace('_', '-')} ({getattr(profile, key):g}), "
                            f"not measured; pass the real figure")
    profile = dataclasses.replace(profile, sources=sources)
    text = profile.to_toml()
    print(text, end="")
    if out is not None:
        try:
            with out.open("w" if args.force else "x") as f:
                f.write(text)
            load_profile(str(out))  # what we wrote must load back
        except FileExistsError:
            parser.error(f"--out {out} already exists; pass --force to overwrite it")
        except (OSError, ProfileError) as exc:
            parser.error(f"could not write {out}: {exc}")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
