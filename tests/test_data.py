"""Data: offline sources, seeded partitions, the public slice, batched augmentation."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_app.data import (Batches, DataError, augment_batch, federated_split, load_dataset, make_synthetic,
                         partition)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# Outside CI a checkout without ../shared skips the real-data tests; in CI they must run (and fail
# loudly if the data is missing), so a green CI always means real data was used.
needs_shared = pytest.mark.skipif(not (SHARED / "MNIST").exists() and not os.environ.get("CI"),
                                  reason="../shared/data not present")


def test_synthetic_is_deterministic_balanced_and_not_noise():
    a, b = make_synthetic(seed=3, train_size=500), make_synthetic(seed=3, train_size=500)
    assert torch.equal(a.x_train, b.x_train)
    counts = torch.bincount(a.y_train, minlength=10)
    assert counts.min() > 20
    # Learnable: the nearest class mean of the training set beats chance on the test set by far.
    means = torch.stack([a.x_train[a.y_train == c].float().mean(0) for c in range(10)])
    dists = ((a.x_test.float()[:, None] - means[None]) ** 2).flatten(2).sum(2)
    accuracy = (dists.argmin(1) == a.y_test).float().mean()
    assert accuracy > 0.3


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_complete_and_reproducible(scheme):
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    parts = partition(labels, 7, scheme, seed=5, alpha=0.3)
    assert sum(len(p) for p in parts) == 2000
    assert len(np.unique(np.concatenate(parts))) == 2000
    again = partition(labels, 7, scheme, seed=5, alpha=0.3)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_shards_give_each_client_few_classes_and_dirichlet_skews():
    labels = np.repeat(np.arange(10), 200)
    shards = partition(labels, 10, "shards", seed=0, shards_per_client=2)
    assert max(len(np.unique(labels[p])) for p in shards) <= 2
    skewed = partition(labels, 10, "dirichlet", seed=0, alpha=0.1)
    assert np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in skewed]) > 0.5


def test_public_slice_is_held_out_of_every_client():
    d = make_synthetic(train_size=1000, test_size=10)
    split = federated_split(d, 5, "iid", 0, 0.5, 2, 100, 0)
    assert len(split.public) == 100
    private = np.concatenate(split.clients)
    assert not set(split.public) & set(private)
    assert len(private) == 900


def test_max_client_examples_caps_each_partition():
    d = make_synthetic(train_size=1000, test_size=10)
    split = federated_split(d, 4, "iid", 0, 0.5, 2, 0, 50)
    assert [len(c) for c in split.clients] == [50] * 4


def test_augmentation_is_batched_shape_preserving_and_seeded():
    x = torch.randn(16, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_batches_normalize_and_cover_the_set_once_per_epoch():
    d = make_synthetic(train_size=100, test_size=10)
    batches = Batches(d.x_train, d.y_train, d, batch_size=32)
    seen = torch.cat([y for _, y in batches.epoch(0)])
    assert len(seen) == 100 and sorted(seen.tolist()) == sorted(d.y_train.tolist())
    x, _ = next(batches.epoch(0))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.3


def test_missing_offline_data_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"MNIST/raw"):
        load_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="data-dir"):
        load_dataset("cifar10", "")
    with pytest.raises(DataError, match="valid: synthetic"):
        load_dataset("imagenet", str(tmp_path))


def test_npz_with_wrong_arrays_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="missing arrays"):
        load_dataset(f"npz:{bad}")
    mismatched = tmp_path / "mismatch.npz"
    np.savez(mismatched, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.zeros(3, np.int64),
             x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="4 train images but 3 labels"):
        load_dataset(f"npz:{mismatched}")


def test_npz_in_hwc_layout_is_read_as_nchw(tmp_path):
    good = tmp_path / "good.npz"
    rng = np.random.default_rng(0)
    np.savez(good, x_train=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), y_train=np.arange(6) % 3,
             x_test=rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8), y_test=np.arange(2))
    d = load_dataset(f"npz:{good}")
    assert d.x_train.shape == (6, 3, 8, 8) and d.num_classes == 3


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (200 if cls == "cat" else 10, 0, 0)).save(tmp_path / split / cls / "a.png")
    d = load_dataset(f"imagefolder:{tmp_path}")
    assert d.x_train.shape == (2, 3, 32, 32) and d.y_train.tolist() == [0, 1]


@needs_shared
def test_real_mnist_and_cifar10_load_from_shared_data():
    mnist = load_dataset("mnist", str(SHARED))
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    cifar = load_dataset("cifar10", str(SHARED))
    assert cifar.x_train.shape == (50000, 3, 32, 32)
    assert [round(m, 1) for m in cifar.mean] == [125.3, 123.0, 113.9]
