"""Inputs a user brings from the field (issue #14): every split checked alike, empty sets refused,
ImageFolder leftovers, models whose BatchNorm would see one value per channel, more nodes than
test examples. Each bad input is refused with one clear DataError before any training, or handled."""

import warnings

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client_app.node import LocalNode
from fl_app.cost import model_cost
from fl_app import data as fl_data, training as fl_training
from fl_app.data import Batches, DataError, load_dataset, make_synthetic
from fl_app.models import ModelSpec, build_model
from fl_app.training import TrainConfig, distill, evaluate, train
from server_app.server_app import main
from experiments.inprocess import InProcessGrid
from fl_app.results import load_results


def _npz(path, n_train=40, n_test=10, shape=(8, 8), classes=3, **override):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (n_train, *shape), dtype=np.uint8),
              "y_train": np.arange(n_train) % classes,
              "x_test": rng.integers(0, 255, (n_test, *shape), dtype=np.uint8),
              "y_test": np.arange(n_test) % classes}
    arrays.update(override)
    np.savez(path, **arrays)
    return f"npz:{path}"


def _run(tmp_path, num_nodes, **overrides):
    config = {"strategy": "fedavg", "memory-pool": "", "num-server-rounds": 1, "device-mix": "laptop:1,workstation:1", "output-dir": str(tmp_path),
              "run-name": "run", "public-size": 8, "max-client-examples": 16, "min-nodes": 2, **overrides}
    grid = InProcessGrid(config, num_nodes)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return load_results(tmp_path / "run")


def _assert_stopped_before_training(tmp_path):
    """Nothing trained; results.json says so (issue #14 item 8)."""
    doc = load_results(tmp_path / "run")
    assert doc["status"] == "failed" and doc["error"] and doc["rounds"] == [] and doc["stopped_before_training"]


# --- 1. every split is checked like the training split -------------------------------------------


@pytest.mark.parametrize("split", ["y_train", "y_test"])
def test_negative_labels_are_refused_in_either_split_naming_split_and_values(tmp_path, split):
    labels = np.arange(40 if split == "y_train" else 10) % 3
    labels[[1, 4]] = [-1, -3]
    name = _npz(tmp_path / "bad.npz", **{split: labels})
    with pytest.raises(DataError) as info:
        load_dataset(name)
    message = str(info.value)
    assert split in message and "-1" in message and "-3" in message and "\n" not in message


@pytest.mark.parametrize("split", ["y_train", "y_test"])
def test_fractional_labels_are_refused_in_either_split(tmp_path, split):
    labels = (np.arange(40 if split == "y_train" else 10) % 3).astype(np.float32)
    labels[2] = 0.5
    with pytest.raises(DataError, match=rf"{split}.*integer"):
        load_dataset(_npz(tmp_path / "bad.npz", **{split: labels}))


def test_whole_number_float_labels_are_accepted(tmp_path):
    d = load_dataset(_npz(tmp_path / "ok.npz", y_test=(np.arange(10) % 3).astype(np.float64)))
    assert d.y_test.dtype == torch.int64 and d.y_test.tolist()[:3] == [0, 1, 2]


@pytest.mark.parametrize("split", ["y_train", "y_test"])
def test_one_hot_labels_are_refused_naming_the_split_and_shape(tmp_path, split):
    n = 40 if split == "y_train" else 10
    one_hot = np.eye(3, dtype=np.int64)[np.arange(n) % 3]
    with pytest.raises(DataError, match=rf"{split}.*\({n}, 3\).*argmax"):
        load_dataset(_npz(tmp_path / "bad.npz", **{split: one_hot}))


@pytest.mark.parametrize("split", ["x_train", "x_test"])
def test_non_finite_float_images_are_refused_in_either_split(tmp_path, split):
    n = 40 if split == "x_train" else 10
    x = np.random.default_rng(1).random((n, 8, 8)).astype(np.float32)
    x[0, 0, 0] = np.nan
    with pytest.raises(DataError, match=rf"{split}.*NaN"):
        load_dataset(_npz(tmp_path / "bad.npz", **{split: x}))


def test_splits_scaled_differently_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(DataError, match=r"x_train.*float 0\.\.1.*x_test.*float 0\.\.255"):
        load_dataset(_npz(tmp_path / "bad.npz", x_train=rng.random((40, 8, 8)),
                          x_test=rng.random((10, 8, 8)) * 255))


def test_bad_test_labels_stop_the_run_before_any_training(tmp_path):
    y_test = np.arange(10) % 3
    y_test[3] = -1
    name = _npz(tmp_path / "bad.npz", y_test=y_test)
    with pytest.raises(DataError, match="y_test"):
        _run(tmp_path, 2, dataset=name, model="cnn")
    _assert_stopped_before_training(tmp_path)


# --- 2. empty splits ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_split_is_refused(tmp_path, split):
    empty = {f"x_{split}": np.zeros((0, 8, 8), np.uint8), f"y_{split}": np.zeros(0, np.int64)}
    with pytest.raises(DataError, match=rf"x_{split}.*no examples"):
        load_dataset(_npz(tmp_path / "empty.npz", **empty))


def test_an_empty_test_set_stops_the_run_before_training(tmp_path):
    name = _npz(tmp_path / "empty.npz", x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="x_test"):
        _run(tmp_path, 2, dataset=name)
    _assert_stopped_before_training(tmp_path)


def test_evaluating_zero_examples_records_no_accuracy():
    d = make_synthetic(train_size=20, test_size=4)
    empty = Batches(d.x_test[:0], d.y_test[:0], d, batch_size=8, shuffle=False)
    assert evaluate(build_model(ModelSpec("cnn")), empty) == (None, None, 0)


# --- 3. ImageFolder leftovers ----------------------------------------------------------------------


def _tree(root, classes=("cat", "dog"), per_class=2):
    from PIL import Image

    for split in ("train", "test"):
        for i, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.new("RGB", (20, 20), (60 * i, 10 * k, 0)).save(root / split / cls / f"{k}.png")


def test_hidden_files_and_folders_are_ignored(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "test" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    for split in ("train", "test"):
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        (tmp_path / split / ".ipynb_checkpoints" / "x-checkpoint.ipynb").write_text("{}")
    (tmp_path / "train" / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "train" / "dog" / "._1.png").write_bytes(b"\x00\x05\x16\x07")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fl_data.DataWarning)  # hidden entries are not worth a warning
        d = load_dataset(f"imagefolder:{tmp_path}")
    assert d.num_classes == 2 and d.x_train.shape[0] == 4 and d.x_test.shape[0] == 4


def test_other_non_image_files_are_skipped_with_one_counting_warning(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"garbage")
    (tmp_path / "test" / "dog" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (tmp_path / "train" / "labels.csv").write_text("file,label\n")  # outside any class folder
    with pytest.warns(fl_data.DataWarning) as caught:
        d = load_dataset(f"imagefolder:{tmp_path}")
    ours = [w for w in caught if issubclass(w.category, fl_data.DataWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "4 files" in message and "notes.txt" in message
    assert d.num_classes == 2 and len(d.y_train) == 4 and len(d.y_test) == 4


def test_images_in_subfolders_of_a_class_are_read(tmp_path):
    from PIL import Image

    _tree(tmp_path)
    (tmp_path / "train" / "cat" / "more").mkdir()
    Image.new("L", (10, 10), 7).save(tmp_path / "train" / "cat" / "more" / "x.bmp")
    d = load_dataset(f"imagefolder:{tmp_path}")
    assert d.y_train.tolist() == [0, 0, 0, 1, 1]


def test_a_class_folder_without_images_is_refused_by_name(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "notes").mkdir()
    (tmp_path / "train" / "notes" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"train/notes.*no images"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_a_test_class_missing_from_train_is_refused_by_name(tmp_path):
    _tree(tmp_path)
    _tree(tmp_path / "extra", classes=("bird",))
    (tmp_path / "extra" / "test" / "bird").rename(tmp_path / "test" / "bird")
    with pytest.raises(DataError, match=r"test/bird.*not in train"):
        load_dataset(f"imagefolder:{tmp_path}")


# --- 4. BatchNorm with one value per channel ------------------------------------------------------


def _gray16(n_train=33, n_test=6):
    d = make_synthetic(train_size=n_train, test_size=n_test, shape=(1, 16, 16))
    return d


def test_cost_model_prices_a_model_whose_last_maps_are_1x1():
    cost = model_cost(ModelSpec("vgg11", 10, 1), (1, 16, 16))
    assert cost.train_flops_per_sample > 0 and cost.transient_bytes_per_sample > 0
    assert model_cost(ModelSpec("resnet18", 10, 3), (3, 1, 1)).params > 0
    # the per-sample layer figure is unchanged where batch 1 always worked
    big = model_cost(ModelSpec("cnn"), (3, 32, 32))
    assert big.transient_bytes_per_sample == 4 * 2 * 32 * 32 * 32  # BatchNorm on conv1's map: input + output


def test_training_never_feeds_a_batch_of_one_to_batchnorm_and_counts_honestly():
    d = _gray16(33)
    model = build_model(ModelSpec("vgg11", 10, 1))
    result = train(model, Batches(d.x_train, d.y_train, d, batch_size=32), TrainConfig(batch_size=32))
    assert result.num_examples == 32  # the trailing single example is dropped, and not counted


def test_a_trailing_single_example_is_kept_where_batchnorm_sees_more_than_one_value():
    d = make_synthetic(train_size=33, test_size=4)
    result = train(build_model(ModelSpec("cnn")), Batches(d.x_train, d.y_train, d, batch_size=32),
                   TrainConfig(batch_size=32))
    assert result.num_examples == 33


def test_distillation_never_feeds_a_batch_of_one_to_batchnorm():
    d = _gray16(33)
    model = build_model(ModelSpec("vgg11", 10, 1))
    loss = distill(model, Batches(d.x_train, torch.randn(33, 10), d, batch_size=32), TrainConfig(batch_size=32),
                   epochs=1, temperature=3.0)
    assert np.isfinite(loss)


def test_a_node_with_a_single_example_gets_a_clear_error_not_a_batchnorm_crash():
    d = _gray16(1)
    with pytest.raises(DataError, match="1 example"):
        train(build_model(ModelSpec("vgg11", 10, 1)), Batches(d.x_train, d.y_train, d, batch_size=32),
              TrainConfig(batch_size=32))


@pytest.mark.parametrize("name, shape, batch, smallest", [
    ("cnn", (3, 2, 2), 32, 4),        # two 2x2 max-pools need at least 4x4
    ("vgg11", (1, 16, 16), 1, 17),    # batch 1: the last stage must keep more than one position
    ("resnet18", (3, 8, 8), 1, 9),
])
def test_a_model_and_input_size_that_cannot_work_are_refused_naming_the_smallest(name, shape, batch, smallest):
    assert fl_training.smallest_input_size(ModelSpec(name, 10, shape[0]), batch) == smallest
    with pytest.raises(DataError, match=rf"{name}.*{smallest}x{smallest}"):
        fl_training.check_input_size(ModelSpec(name, 10, shape[0]), shape, batch)
    fl_training.check_input_size(ModelSpec(name, 10, shape[0]), (shape[0], smallest, smallest), batch)


def test_vgg11_on_16x16_grayscale_runs_every_round(tmp_path):
    d = _gray16(200, 20)
    name = _npz(tmp_path / "gray16.npz", x_train=d.x_train.numpy()[:, 0], y_train=d.y_train.numpy(),
                x_test=d.x_test.numpy()[:, 0], y_test=d.y_test.numpy())
    results = _run(tmp_path, 2, dataset=name, model="vgg11", **{"num-server-rounds": 2,
                                                                "max-client-examples": 33})
    assert results["status"] == "completed" and len(results["rounds"]) == 2
    assert all(c["participated"] and c["num_examples"] == 32 for r in results["rounds"] for c in r["clients"])


def test_a_too_small_input_stops_the_run_before_training(tmp_path):
    name = _npz(tmp_path / "tiny.npz", shape=(2, 2))
    with pytest.raises(DataError, match=r"cnn.*4x4"):
        _run(tmp_path, 2, dataset=name, model="cnn")
    _assert_stopped_before_training(tmp_path)


# --- 6. more nodes than test examples; the node test share follows test-size ------------------------


def _node(run_config, partition_id, num_partitions):
    context = Context(run_id=1, node_id=partition_id + 1, state=RecordDict(), run_config={"memory-pool": "", **run_config},
                      node_config={"partition-id": partition_id, "num-partitions": num_partitions})
    return LocalNode.from_context(context)


def test_a_node_beyond_the_test_set_gets_an_empty_share(tmp_path):
    name = _npz(tmp_path / "five.npz", n_test=5)
    shares = [len(_node({"dataset": name}, pid, 8).test_batches()) for pid in range(8)]
    assert shares == [1, 1, 1, 1, 1, 0, 0, 0]


def test_node_test_shares_split_the_test_size_subset(tmp_path):
    name = _npz(tmp_path / "many.npz", n_test=1000)
    config = {"dataset": name, "test-size": 100, "seed": 3}
    nodes = [_node(config, pid, 4) for pid in range(4)]
    shares = [n.test_batches() for n in nodes]
    assert [len(s) for s in shares] == [25, 25, 25, 25]
    subset = fl_data.evaluation_indices(1000, 100, 3)
    d = nodes[0].dataset
    together = torch.cat([s.x for s in shares])
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, d.x_test[torch.from_numpy(subset)].numpy()))


def test_more_nodes_than_test_examples_every_node_trains_and_empty_shares_report_null(tmp_path):
    name = _npz(tmp_path / "five.npz", n_train=200, n_test=5, shape=(16, 16))
    results = _run(tmp_path, 8, dataset=name, strategy="heterofl", **{"device-mix": "workstation:1"})
    assert results["status"] == "completed"
    clients = results["rounds"][0]["clients"]
    assert all(c["participated"] and c["error"] is None for c in clients)
    accuracies = [c["submodel_accuracy"] for c in sorted(clients, key=lambda c: c["node_id"])]
    assert all(a is not None for a in accuracies[:5]) and accuracies[5:] == [None, None, None]
