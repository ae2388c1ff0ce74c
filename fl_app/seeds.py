"""Seeds: any integer a user types as run-config `seed` becomes valid numpy and torch generators.

A run-config integer is a signed 64-bit TOML integer (Flower carries it as one), so `seed` may be
-1, 2**32 - 1 or a millisecond timestamp. numpy's generators take only non-negative integers and
torch's only [-2^63, 2^64), and the app derives sub-seeds arithmetically (seed + 7, one per node and
round as seed * 7919 + partition * 104729 + round, one per epoch as that * 1_000_003 + epoch), which
leaves either range for large or negative seeds. Every seed goes through `generator_seed` where it
becomes a generator: reduced modulo 2^64. That keeps every seed valid for both libraries as it was
(torch already reads a negative seed modulo 2^64, so its streams do not change either) and maps the
others one-to-one from the signed 64-bit range a user can type.
"""

from __future__ import annotations

import numpy as np
import torch

SEED_RANGE = (-(2**63), 2**63 - 1)  # what run-config `seed` may be: a signed 64-bit integer


def generator_seed(value: int) -> int:
    """`value` (any integer) as a seed both numpy and torch accept: `value` mod 2^64."""
    return value % 2**64


def numpy_rng(seed: int | list[int]) -> np.random.Generator:
    """numpy's default generator seeded by `seed`, or by a list of words (one stream per combination)."""
    words = [generator_seed(w) for w in seed] if isinstance(seed, list) else generator_seed(seed)
    return np.random.default_rng(words)


def torch_generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded by `seed` (any integer)."""
    return torch.Generator().manual_seed(generator_seed(seed))
