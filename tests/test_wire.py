"""Wire encodings: fp32 exact, fp16 and int8 close, sizes counted as serialized."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
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


# Array lengths around every varint boundary of the nested length prefixes (127/128, 2^14, 2^21 bytes).
LENGTHS = st.sampled_from([0, 1, 100, 120, 127, 128, 129, 16_300, 16_384, 16_500, 2**21 - 150, 2**21 + 7])


@settings(max_examples=40, deadline=None)
@given(records=st.lists(st.tuples(st.text(max_size=300), st.lists(st.tuples(st.text(max_size=200), LENGTHS),
                                                                   max_size=4)), max_size=3),
       metrics=st.dictionaries(st.text(max_size=20), st.floats(allow_nan=False), max_size=3))
def test_the_byte_count_is_the_serialized_size_without_serializing_the_arrays(records, metrics):
    content = RecordDict({f"a{i}{key}": ArrayRecord({f"{j}{name}": Array(np.zeros(n, dtype=np.uint8))
                                                      for j, (name, n) in enumerate(arrays)})
                          for i, (key, arrays) in enumerate(records)})
    content["metrics"] = MetricRecord(metrics)
    content["job"] = ConfigRecord({"json": "{}", "blob": b"x" * 200})
    content["empty"] = ArrayRecord({"nothing": Array(dtype="", shape=(), stype="", data=b"")})
    assert serialized_bytes(content) == recorddict_to_proto(content).ByteSize()


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="valid: fp32, fp16, int8"):
        encode(tensors(), "bf8")
