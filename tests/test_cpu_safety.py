"""The one-thread decision for ARMv8.0 cores, on /proc/cpuinfo texts as real boards print them."""

from __future__ import annotations

import pytest

from fl_app import cpu_safety

# 64-bit Raspberry Pi OS (Bookworm); first core shown, the others repeat it.
A53_CORE = """processor\t: {}
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd03
CPU revision\t: 4

"""
PI_3B_PLUS = A53_CORE.format(0) + A53_CORE.format(1) + """Revision\t: a020d3
Serial\t\t: 00000000a1b2c3d4
Model\t\t: Raspberry Pi 3 Model B Plus Rev 1.3
"""

PI_4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Revision\t: c03114
Serial\t\t: 10000000a1b2c3d4
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

PI_5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

Revision\t: c04170
Serial\t\t: a1b2c3d4e5f60718
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""

JETSON_NANO = """processor\t: 0
model name\t: ARMv8 Processor rev 1 (v8l)
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd07
CPU revision\t: 1
"""

PI_4_32BIT = """processor\t: 0
model name\t: ARMv7 Processor rev 3 (v7l)
BogoMIPS\t: 108.00
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer\t: 0x41
CPU architecture: 7
CPU part\t: 0xd08
"""

X86_64 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 avx avx2
"""

# A big.LITTLE board where one cluster lacks the feature: the safe answer is the common set.
MIXED = PI_5 + "\n" + PI_4


@pytest.mark.parametrize("text, machine, expected", [
    (PI_3B_PLUS, "aarch64", True),     # Cortex-A53, ARMv8.0
    (PI_4, "aarch64", True),           # Cortex-A72, ARMv8.0
    (JETSON_NANO, "aarch64", True),    # Cortex-A57, ARMv8.0
    (PI_5, "aarch64", False),          # Cortex-A76, ARMv8.2: atomics listed
    (MIXED, "aarch64", True),
    (PI_4_32BIT, "armv7l", False),     # 32-bit OS: not judged (PyTorch has no wheels for it)
    (X86_64, "x86_64", False),
    ("", "aarch64", True),             # unreadable cpuinfo on aarch64: one thread, never a crash
])
def test_decision_on_real_boards(text, machine, expected):
    assert cpu_safety.lacks_lse_atomics(text, machine) is expected


def test_features_are_the_cores_common_set():
    assert "atomics" in cpu_safety.cpu_features(PI_5)
    assert "atomics" not in cpu_safety.cpu_features(MIXED)
    assert cpu_safety.cpu_features(X86_64) is None


def test_apply_limits_threads_once_and_logs_once(tmp_path, monkeypatch, caplog):
    import torch
    info = tmp_path / "cpuinfo"
    info.write_text(PI_4)
    monkeypatch.setattr(cpu_safety, "_decided", None)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="fl_app.cpu_safety"):
            first = cpu_safety.apply(info, machine="aarch64")
            again = cpu_safety.apply(info, machine="aarch64")
        assert first and first == again and "1 intra-op thread" in first
        assert torch.get_num_threads() == 1
        assert sum("LSE atomics" in r.getMessage() for r in caplog.records) == 1
    finally:
        torch.set_num_threads(before)


def test_apply_leaves_other_cpus_alone(tmp_path, monkeypatch):
    import torch
    info = tmp_path / "cpuinfo"
    info.write_text(PI_5)
    monkeypatch.setattr(cpu_safety, "_decided", None)
    before = torch.get_num_threads()
    assert cpu_safety.apply(info, machine="aarch64") is None
    assert torch.get_num_threads() == before
    monkeypatch.setattr(cpu_safety, "_decided", None)
    info.write_text(X86_64)
    assert cpu_safety.apply(info, machine="x86_64") is None
    assert torch.get_num_threads() == before
