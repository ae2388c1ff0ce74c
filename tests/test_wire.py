"""Wire encodings: fp32 exact, fp16 and int8 close, sizes counted as serialized."""

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fl_app.wire import decode, encode, serialized_bytes


def tensors():
    torch.manual_seed(0)
    return {"w": torch.randn(64, 32), "b": torch.randn(64) * 5, "count": torch.tensor(7)}


def test_fp32_round_trip_is_exact():
    out = decode(encode(tensors(), "fp32"))
    assert all(torch.equal(out[k], v) for k, v in tensors().items())


@pytest.mark.parametrize("encoding,tolerance", [("fp16", 1e-2), ("int8", 0.03)])
def test_reduced_precision_round_trips_within_its_resolution(encoding, tolerance):
    src = tensors()
    out = decode(encode(src, encoding))
    for name in ("w", "b"):
        span = float(src[name].max() - src[name].min())
        assert (out[name] - src[name]).abs().max() <= tolerance * span
    assert out["count"].item() == 7 and out["count"].dtype == torch.int64


def test_int8_keeps_zero_exact():
    out = decode(encode({"z": torch.tensor([0.0, 0.0, 1.5, -0.5])}, "int8"))
    assert out["z"][0] == 0 and out["z"][1] == 0


def test_smaller_encodings_are_smaller_on_the_wire():
    sizes = {e: serialized_bytes(RecordDict({"t": encode(tensors(), e)})) for e in ("fp32", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    assert sizes["fp32"] > 4 * (64 * 32 + 64)


def test_byte_count_equals_the_serialized_message_content():
    content = RecordDict({"weights": encode(tensors()), "job": ConfigRecord({"json": "{}"})})
    assert serialized_bytes(content) == len(recorddict_to_proto(content).SerializeToString())


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="valid: fp32, fp16, int8"):
        encode(tensors(), "bf8")
