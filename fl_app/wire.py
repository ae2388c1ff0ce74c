"""What crosses the wire: tensors encoded as fp32, fp16 or int8, and their exact size.

int8 is per-tensor affine quantization: q = round(x / scale) + zero, with `scale`
and `zero` sent beside the tensor as `<name>::qparams`. Integer tensors (BatchNorm
counters) always travel as they are. Sizes are the Protobuf bytes Flower
serializes, not an estimate.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

ENCODINGS = ("fp32", "fp16", "int8")
_QPARAMS = "::qparams"


def encode(tensors: dict[str, torch.Tensor], encoding: str = "fp32") -> ArrayRecord:
    """Tensors -> an ArrayRecord in `encoding`."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    arrays: dict[str, Array] = {}
    for name, tensor in tensors.items():
        values = tensor.detach().cpu()
        if not values.is_floating_point() or encoding == "fp32":
            arrays[name] = Array(values.float().numpy() if values.is_floating_point() else values.numpy())
        elif encoding == "fp16":
            arrays[name] = Array(values.half().numpy())
        else:
            q, qparams = _quantize_int8(values.float())
            arrays[name] = Array(q)
            arrays[name + _QPARAMS] = Array(qparams)
    return ArrayRecord(arrays)


def decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord made by `encode` -> fp32 tensors (integer tensors keep their dtype)."""
    out: dict[str, torch.Tensor] = {}
    for name in record:
        if name.endswith(_QPARAMS):
            continue
        array = record[name].numpy()
        if name + _QPARAMS in record:
            scale, zero = record[name + _QPARAMS].numpy().astype(np.float64)
            array = ((array.astype(np.float32) - np.float32(zero)) * np.float32(scale))
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        out[name] = torch.from_numpy(np.array(array))
    return out


def _quantize_int8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # keep 0 exact (pruned / ReLU zeros)
    scale = (hi - lo) / 255.0 or 1.0
    zero = round(-128 - lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, -128, 127).to(torch.int8)
    return q.numpy(), np.array([scale, zero], dtype=np.float32)


def serialized_bytes(content: RecordDict) -> int:
    """Exact size of `content` as Flower serializes it into a message."""
    return recorddict_to_proto(content).ByteSize()
