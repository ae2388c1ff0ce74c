"""Keep PyTorch's CPU kernels off instructions that Raspberry Pi 3B+/4 cores do not have.

The Cortex-A53 (Pi 3B+), Cortex-A57 (Jetson Nano) and Cortex-A72 (Pi 4) are ARMv8.0 cores: they
lack the LSE atomics (ARMv8.1: `ldadd`, `cas`, ...). Some PyTorch aarch64 builds use them in the
thread pool of their bundled BLAS, so a matrix multiply on two or more threads dies with SIGILL
there, while one thread works (measured under QEMU: scripts/emulate_pi.sh,
benchmarks/results/pi_emulation.txt). The kernel lists the feature as `atomics` in the `Features`
line of /proc/cpuinfo (a Pi 5's Cortex-A76 has it), so: on aarch64 without `atomics`, PyTorch gets
one intra-op thread. Elsewhere nothing changes.

`apply()` is called once per process by the ClientApp (at import) and by `fl_app.measure`, before
any tensor work; it logs its decision once.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

LOG = logging.getLogger("fl_app.cpu_safety")
AARCH64 = ("aarch64", "arm64")
# Environment read when the BLAS / OpenMP runtime loads: set too when torch is not imported yet.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_decided: str | None = None  # the reason logged by the first apply() in this process


def cpu_features(cpuinfo: str) -> set[str] | None:
    """The features every core lists (intersection of the `Features` lines); None: no such line."""
    found = None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "features":
            found = set(value.split()) if found is None else found & set(value.split())
    return found


def lacks_lse_atomics(cpuinfo: str, machine: str) -> bool:
    """True on an aarch64 CPU whose cpuinfo does not list `atomics` on every core (ARMv8.0: Pi 3B+, Pi 4).

    Only aarch64 is judged: x86 lists no `atomics`, and 32-bit ARM (armv7l) has no PyTorch wheels.
    An aarch64 cpuinfo without any `Features` line is taken as unsafe (one thread: slower, never a
    crash)."""
    if machine.lower() not in AARCH64:
        return False
    features = cpu_features(cpuinfo)
    return features is None or "atomics" not in features


def apply(cpuinfo_path: str | Path = "/proc/cpuinfo", machine: str | None = None) -> str | None:
    """Limit PyTorch to one intra-op thread when the CPU lacks LSE atomics; the reason, or None.

    Idempotent: the decision is made and logged once per process."""
    global _decided
    if _decided is not None:
        return _decided or None
    machine = machine or platform.machine()
    try:
        cpuinfo = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    if not lacks_lse_atomics(cpuinfo, machine):
        _decided = ""
        return None
    import sys
    if "torch" not in sys.modules:  # the BLAS thread pool reads these when it loads
        for name in THREAD_ENV:
            os.environ[name] = "1"
    import torch
    torch.set_num_threads(1)
    _decided = (f"{machine} CPU without LSE atomics (no 'atomics' in {cpuinfo_path} Features): "
                f"PyTorch limited to 1 intra-op thread (multi-threaded BLAS dies with SIGILL on ARMv8.0 cores)")
    LOG.warning(_decided)
    return _decided
