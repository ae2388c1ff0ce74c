"""Loaded by every emulated Raspberry Pi process (scripts/emulate_pi.sh puts this folder on PYTHONPATH).

Flower 1.41 gives a ClientApp process HEARTBEAT_DEFAULT_INTERVAL = 30 s (hard-coded in
flwr/common/constant.py) to start and claim its task; the SuperNode then expires the task's token,
starts another process, and so on. Under QEMU user emulation, loaded, `import flwr` alone takes
longer than 30 s (a board imports it in a few seconds), so every emulated ClientApp process was
refused ("Runtime task-token authentication failed") and replaced, forever. When FL_FLWR_HEARTBEAT_S
is set (scripts/emulate_pi.py sets it for its emulated SuperNodes), Flower's heartbeat interval is
that many seconds instead, in the emulated processes only; on a real board nothing changes.
"""

import os

if os.environ.get("FL_FLWR_HEARTBEAT_S"):
    import flwr.common.constant as _constant  # before any Flower module copies the value

    _constant.HEARTBEAT_DEFAULT_INTERVAL = int(os.environ["FL_FLWR_HEARTBEAT_S"])
