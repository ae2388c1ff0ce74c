"""A user's own data (issue #23 items 1, 2, 3, 9; issue #22's crafted CIFAR batch): every pixel encoding
and layout users store is converted exactly or refused naming what was found; a broken or crafted file
is refused in one line naming it, never executed; splits a run cannot learn or score honestly are
refused; labels read in a way the user may not expect are said so."""

import gzip
import pickle
import warnings

import numpy as np
import pytest

from fl_app.data import DataError, DataWarning, load_dataset, read_cifar_batch
from tests.test_data import SHARED, needs_shared

RNG = np.random.default_rng(23)


def _images(n: int, channels: int = 3, side: int = 8) -> np.ndarray:
    """uint8 (n, C, H, W) covering 0 and 255, so every encoding's full range occurs."""
    x = RNG.integers(0, 256, (n, channels, side, side), dtype=np.uint8)
    x.flat[0], x.flat[1] = 0, 255
    return x


def _npz(path, x_train, x_test, y_train=None, y_test=None):
    y_train = np.arange(len(x_train)) % 3 if y_train is None else y_train
    y_test = np.arange(len(x_test)) % 3 if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


# --- 1. pixel encodings and layouts -----------------------------------------------------------------

ENCODINGS = {  # how users store a uint8 image u: name -> u encoded
    "uint8": lambda u: u,
    "float 0..1 (ToTensor)": lambda u: u.astype(np.float32) / 255,
    "float -1..1 (Normalize((0.5,), (0.5,)))": lambda u: (u.astype(np.float32) / 255 - 0.5) / 0.5,
    "float64 0..255": lambda u: u.astype(np.float64),
    "float16 0..1": lambda u: (u.astype(np.float32) / 255).astype(np.float16),
    "uint16 (16-bit, u * 257)": lambda u: u.astype(np.uint16) * 257,
    "int64 0..255": lambda u: u.astype(np.int64),
    "int32 0..255": lambda u: u.astype(np.int32),
}
LAYOUTS = {"NCHW": lambda x: x, "NHWC": lambda x: x.transpose(0, 2, 3, 1)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_pixel_encoding_and_layout_loads_as_the_exact_uint8_images(tmp_path, encoding, layout):
    u_train, u_test = _images(30), _images(9)
    enc, lay = ENCODINGS[encoding], LAYOUTS[layout]
    d = load_dataset(_npz(tmp_path / "x.npz", lay(enc(u_train)), lay(enc(u_test))))
    if encoding == "float16 0..1":  # float16 has 11 significant bits: every level survives, within one step
        assert np.abs(d.x_train.numpy().astype(int) - u_train).max() <= 1
        return
    np.testing.assert_array_equal(d.x_train.numpy(), u_train)
    np.testing.assert_array_equal(d.x_test.numpy(), u_test)


def test_grey_images_without_a_channel_axis_and_booleans_load_exactly(tmp_path):
    u = _images(30, channels=1)
    d = load_dataset(_npz(tmp_path / "grey.npz", u[:, 0], u[:9, 0]))
    np.testing.assert_array_equal(d.x_train.numpy(), u)
    binary = u > 127
    d = load_dataset(_npz(tmp_path / "binary.npz", binary, binary[:9]))
    np.testing.assert_array_equal(d.x_train.numpy(), binary * np.uint8(255))


def test_minus_one_to_one_images_are_not_clipped_to_their_positive_half(tmp_path):
    """The field report: torchvision's Normalize((0.5,), (0.5,)) output saved as npz lost every pixel
    below mid-grey (clipped to 0)."""
    u = _images(30)
    x = (u.astype(np.float32) / 255 - 0.5) / 0.5
    d = load_dataset(_npz(tmp_path / "x.npz", x, x[:9]))
    assert (d.x_train.numpy() < 128).mean() == pytest.approx((u < 128).mean())


@needs_shared
def test_real_cifar10_stored_as_minus_one_to_one_floats_loads_as_its_uint8_images(tmp_path):
    with np.load(SHARED / "cifar10" / "cifar10_uint8.npz") as z:
        pick = np.random.default_rng(0).permutation(len(z["y_train"]))[:2000]
        x, y = z["x_train"][pick], z["y_train"][pick]
    normalized = (x.astype(np.float32) / 255 - 0.5) / 0.5
    d = load_dataset(_npz(tmp_path / "c.npz", normalized, normalized[:500], y, y[:500]))
    np.testing.assert_array_equal(d.x_train.numpy(), x.transpose(0, 3, 1, 2))


REFUSED = {  # what a user stored -> what the one-line refusal must name
    "standardized floats (ImageNet mean/std)": (lambda u: (u / 255 - 0.45) / 0.23, r"-1\.9.*standardized"),
    "12-bit integers": (lambda u: u.astype(np.uint16) * 16, r"0 to 4080.*12-bit"),
    "signed integers": (lambda u: u.astype(np.int16) - 128, r"int16 pixels from -128.*negative"),
    "integers above 16 bits": (lambda u: u.astype(np.int64) * 70000, r"more than 16 bits"),
    "floats above 255": (lambda u: u.astype(np.float32) * 4, r"0 to 1020, which is none of"),
    "RGBA": (lambda u: np.concatenate([u, u[:, :1]], 1).transpose(0, 2, 3, 1), r"\(30, 8, 8, 4\).*RGBA"),
    "flattened grey rows": (lambda u: u[:, 0].reshape(len(u), -1), r"\(30, 64\).*flattened.*reshape\(-1, 8, 8\)"),
    "complex numbers": (lambda u: u.astype(np.complex64), r"numbers.*complex64"),
}


@pytest.mark.parametrize("stored", REFUSED)
def test_pixels_of_no_known_encoding_are_refused_naming_what_was_found(tmp_path, stored):
    encode, named = REFUSED[stored]
    x = encode(_images(30))
    with pytest.raises(DataError, match=rf"x_train.*{named}") as info:
        load_dataset(_npz(tmp_path / "x.npz", x, x[:9]))
    assert "\n" not in str(info.value)


def test_an_ambiguous_channel_axis_is_refused():
    x = _images(30, channels=3, side=3)  # (30, 3, 3, 3): axis 1 or axis 3?
    with pytest.raises(DataError, match="ambiguous"):
        from fl_app.data import _from_arrays
        _from_arrays(x, np.arange(30) % 3, x, np.arange(30) % 3, "x")


def test_splits_in_different_encodings_are_refused_naming_both(tmp_path):
    u = _images(30)
    with pytest.raises(DataError, match=r"x_train pixels are float -1\.\.1 but x_test pixels float 0\.\.1"):
        load_dataset(_npz(tmp_path / "x.npz", u / 127.5 - 1, u[:9] / 255))


def test_a_16_bit_test_split_that_stays_below_256_is_read_as_16_bit_like_its_training_split(tmp_path):
    u_train, u_test = _images(30), _images(9) // 200  # test values 0..1 once scaled by 257: below 256
    d = load_dataset(_npz(tmp_path / "x.npz", u_train.astype(np.uint16) * 257, u_test.astype(np.uint16) * 257))
    np.testing.assert_array_equal(d.x_test.numpy(), u_test)


def test_16_bit_png_images_are_scaled_not_clipped_to_white(tmp_path):
    from PIL import Image

    levels = {}
    for split in ("train", "test"):
        for i, cls in enumerate(("dark", "light")):
            (tmp_path / split / cls).mkdir(parents=True)
            level = 257 * (40 + 150 * i)
            Image.fromarray(np.full((32, 32), level, np.uint16)).save(tmp_path / split / cls / "0.png")
            levels[cls] = 40 + 150 * i
    d = load_dataset(f"imagefolder:{tmp_path}")
    assert sorted(np.unique(d.x_train.numpy()).tolist()) == sorted(levels.values())


# --- 2. broken and crafted dataset files ------------------------------------------------------------


def _cifar_folder(root, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [k % 10 for k in range(20)],
                 b"data": RNG.integers(0, 256, (20, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * 20}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load_through_the_restricted_reader(tmp_path, protocol):
    _cifar_folder(tmp_path, protocol)
    d = load_dataset("cifar10", str(tmp_path))
    assert d.x_train.shape == (100, 3, 32, 32) and d.num_classes == 10


class _WouldCreateAFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls open(marker, "w"): the file appears if the pickle is executed
        return open, (self.marker, "w")


def test_a_crafted_cifar_batch_is_refused_and_never_executed(tmp_path):
    folder = _cifar_folder(tmp_path)
    marker = tmp_path / "executed"
    crafted = pickle.dumps({b"data": _WouldCreateAFile(marker), b"labels": [0]}, protocol=2)
    pickle.loads(crafted)[b"data"].close()  # the file is real: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    (folder / "data_batch_3").write_bytes(crafted)
    with pytest.raises(DataError, match=r"data_batch_3: refused, not loaded.*io\.open") as info:
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists() and "\n" not in str(info.value)


BROKEN_PICKLES = {
    "truncated": (lambda good: good[: len(good) // 2], r"not a readable CIFAR batch"),
    "empty": (lambda good: b"", r"the file is empty"),
    "an HTML error page": (lambda good: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", r"HTML page"),
    "a pickle of something else": (lambda good: pickle.dumps([1, 2, 3]), r"not a CIFAR batch.*found list"),
}


@pytest.mark.parametrize("broken", BROKEN_PICKLES)
def test_a_broken_cifar_batch_is_refused_naming_the_file(tmp_path, broken):
    folder = _cifar_folder(tmp_path)
    damage, named = BROKEN_PICKLES[broken]
    (folder / "data_batch_3").write_bytes(damage((folder / "data_batch_3").read_bytes()))
    with pytest.raises(DataError, match=rf"cifar-10-batches-py/data_batch_3: .*{named}") as info:
        load_dataset("cifar10", str(tmp_path))
    assert "\n" not in str(info.value) and "download it again" in str(info.value)


def _idx(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _mnist_folder(root):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 60), ("t10k", 20)):
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(RNG.integers(0, 256, (n, 28, 28)))))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(n) % 10)))
    return raw


def test_a_well_formed_idx_folder_loads_with_the_shapes_its_headers_give(tmp_path):
    _mnist_folder(tmp_path)
    d = load_dataset("mnist", str(tmp_path))
    assert d.x_train.shape == (60, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)


BROKEN_IDX = {
    "a truncated .gz": ("train-images-idx3-ubyte.gz", lambda blob: blob[: len(blob) // 2], r"cannot be read"),
    "a .gz of a short idx": ("train-images-idx3-ubyte.gz",
                             lambda blob: gzip.compress(gzip.decompress(blob)[:-100]),
                             r"header promises 60 x 28 x 28 = 47040 bytes of data but the file holds 46940"),
    "an HTML page": ("t10k-labels-idx1-ubyte.gz", lambda blob: gzip.compress(b"<html>Not found</html>"),
                     r"not an idx file.*HTML page"),
    "not gzip at all": ("t10k-labels-idx1-ubyte.gz", lambda blob: b"PK\x03\x04 a zip", r"cannot be read"),
}


@pytest.mark.parametrize("broken", BROKEN_IDX)
def test_a_broken_mnist_file_is_refused_naming_the_file(tmp_path, broken):
    raw = _mnist_folder(tmp_path)
    name, damage, named = BROKEN_IDX[broken]
    (raw / name).write_bytes(damage((raw / name).read_bytes()))
    with pytest.raises(DataError, match=rf"{name}: .*{named}") as info:
        load_dataset("mnist", str(tmp_path))
    assert "\n" not in str(info.value)


def test_a_short_uncompressed_idx_file_is_refused_naming_it(tmp_path):
    raw = _mnist_folder(tmp_path)
    blob = gzip.decompress((raw / "train-labels-idx1-ubyte.gz").read_bytes())
    (raw / "train-labels-idx1-ubyte.gz").unlink()
    (raw / "train-labels-idx1-ubyte").write_bytes(blob[:-7])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: its header promises 60 = 60 bytes"):
        load_dataset("mnist", str(tmp_path))


BROKEN_NPZ = {"truncated": lambda blob: blob[: len(blob) // 2], "empty": lambda blob: b"",
              "an HTML page": lambda blob: b"<!doctype html><html>Sign in</html>"}


@pytest.mark.parametrize("broken", BROKEN_NPZ)
def test_a_broken_npz_is_refused_naming_the_file(tmp_path, broken):
    u = _images(30)
    name = _npz(tmp_path / "x.npz", u, u[:9])
    (tmp_path / "x.npz").write_bytes(BROKEN_NPZ[broken]((tmp_path / "x.npz").read_bytes()))
    with pytest.raises(DataError, match=r"x\.npz: not a readable \.npz file") as info:
        load_dataset(name)
    assert "\n" not in str(info.value)


def test_read_cifar_batch_names_a_missing_label_key(tmp_path):
    path = tmp_path / "train"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"fine_labels"):
        read_cifar_batch(path, b"fine_labels")


# --- 3. degenerate splits ---------------------------------------------------------------------------


@needs_shared
def test_the_first_rows_of_the_class_sorted_cifar_file_are_refused_as_one_class(tmp_path):
    """The field report: x[:800] of the shipped (class-sorted) CIFAR-10 trained to "accuracy 1.0"."""
    with np.load(SHARED / "cifar10" / "cifar10_uint8.npz") as z:
        name = _npz(tmp_path / "cut.npz", z["x_train"][:800], z["x_test"][:200], z["y_train"][:800], z["y_test"][:200])
    with pytest.raises(DataError, match=r"y_train: all 800 labels are class 0.*class-sorted"):
        load_dataset(name)


def test_a_one_class_test_split_is_refused(tmp_path):
    u = _images(30)
    with pytest.raises(DataError, match=r"y_test: all 9 labels are class 2"):
        load_dataset(_npz(tmp_path / "x.npz", u, u[:9], y_test=np.full(9, 2)))


def test_test_classes_the_training_split_lacks_are_refused(tmp_path):
    u = _images(30)
    with pytest.raises(DataError, match=r"y_test holds classes 3 that no training example has"):
        load_dataset(_npz(tmp_path / "x.npz", u, u[:9], y_test=np.arange(9) % 4))


def test_a_test_split_lacking_training_classes_is_warned_about(tmp_path):
    u = _images(30)
    with pytest.warns(DataWarning, match=r"y_test lacks classes 2 of y_train \(2 of 3 classes\)"):
        load_dataset(_npz(tmp_path / "x.npz", u, u[:9], y_test=np.arange(9) % 2))


# --- 9. labels read differently from how they were stored -------------------------------------------


def test_whole_number_float_labels_are_read_as_indices_and_said_so(tmp_path):
    u = _images(30)
    with pytest.warns(DataWarning, match=r"y_train: labels are float64 whole numbers; read as integer"):
        d = load_dataset(_npz(tmp_path / "x.npz", u, u[:9], y_train=(np.arange(30) % 3).astype(np.float64)))
    assert d.y_train.dtype.is_floating_point is False


def test_labels_from_one_to_n_say_that_class_zero_is_unused(tmp_path):
    u = _images(30)
    with pytest.warns(DataWarning, match=r"labels run from 1 to 3 with no example of class 0; the model gets 4 "
                                         r"outputs, 1 never used"):
        d = load_dataset(_npz(tmp_path / "x.npz", u, u[:9], np.arange(30) % 3 + 1, np.arange(9) % 3 + 1))
    assert d.num_classes == 4


def test_clean_integer_labels_raise_no_warning(tmp_path):
    u = _images(30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_dataset(_npz(tmp_path / "x.npz", u, u[:9]))


def test_what_the_loader_read_differently_is_recorded_in_the_runs_results(tmp_path):
    """Warnings are not only printed: results.json keeps them beside the accuracy they qualify."""
    from flwr.app import Context, RecordDict

    from experiments.inprocess import InProcessGrid
    from fl_app.results import load_results
    from server_app.server_app import main

    u = _images(80, side=32)
    dataset = _npz(tmp_path / "x.npz", u, u[:30], y_train=(np.arange(80) % 3).astype(np.float64))
    config = {"dataset": dataset, "num-server-rounds": 1, "device-mix": "laptop:2", "output-dir": str(tmp_path),
              "run-name": "run", "public-size": 8, "max-client-examples": 16, "min-nodes": 2, "model": "cnn",
              "test-size": 30, "strategy": "fedavg", "memory-pool": ""}
    main(InProcessGrid(config, 2), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    results = load_results(tmp_path / "run")
    assert results["status"] == "completed"
    assert any("labels are float64 whole numbers" in w for w in results["warnings"]), results.get("warnings")
