"""Checkpoints: after every round, everything the server needs to continue the run, written atomically.

A checkpoint holds the strategy's global state (model weights, REFT's ensemble, ProFL's
schedule position and effective-movement history), the sampling RNG, torch's RNG and
the results so far. What nodes kept between rounds is not in it: a resumed run is a new
Flower run, every node starts with an empty context, and the strategies resend what a
node lacks (REFT cuts each node a fresh submodel from the restored global model).

`resume = true` (with the same `run-name`) continues from the last checkpoint; the
results of the resumed run are the checkpoint's rounds followed by the new ones, so no
round is lost or duplicated even if the server died between a checkpoint and its results.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_app.config import ConfigError, RunConfig
from fl_app.results import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Keys that may change between a run and its resumption: how long to wait and how many rounds,
# not what is trained.
RESUMABLE_CHANGES = {"num_server_rounds", "round_timeout", "min_successful_clients", "round_retries", "resume",
                     "min_nodes"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume this run; the message says why and what to do."""


def save_checkpoint(folder: Path, server_round: int, strategy_state: dict[str, Any], rng: np.random.Generator,
                    results: dict[str, Any]) -> None:
    """Write the state after `server_round`; a crash mid-write leaves the previous checkpoint intact."""
    payload = {"format": FORMAT, "round": server_round, "saved_at": time.time(), "strategy": strategy_state,
               "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "results": results}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(folder / CHECKPOINT, buffer.getvalue())


def load_checkpoint(folder: Path, config: RunConfig) -> dict[str, Any]:
    """The last checkpoint in `folder`, checked against the run config that wants to resume it."""
    path = folder / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"resume = true but {path} does not exist: set run-name to a run that finished at "
                              "least one round (its folder under output-dir), or set resume = false")
    try:  # weights_only: a checkpoint is data; loading one must never run code
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT}")
        saved = payload["results"]["config"]
    except Exception as exc:  # a truncated, foreign or tampered file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); "
                              "it was not written by this app, or not completely") from exc
    changed = [f"{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in config.__dict__.items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise ConfigError("resume = true with a run config that changes what is trained:\n  - "
                          + "\n  - ".join(changed) + "\nresume with the checkpoint's values, or start a new run-name")
    return payload


def restore_rng(payload: dict[str, Any], rng: np.random.Generator) -> None:
    rng.bit_generator.state = payload["rng"]
    torch.set_rng_state(payload["torch_rng"])
