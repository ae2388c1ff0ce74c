"""Datasets, partitions and batches.

Images are kept as uint8 tensors (N, C, H, W) and normalized a batch at a time, so a
client holds its whole partition in little memory. Augmentation (random crop with
4-pixel padding, horizontal flip) is done on the whole batch at once.

Sources (run-config `dataset`):
- `synthetic`: generated here, deterministic and learnable (class prototypes seen
  through noise and random shifts), so the app runs anywhere without files;
- `mnist`, `fashion-mnist`, `cifar10`, `cifar100`: read from `data-dir` in the
  on-disk layout torchvision writes (`MNIST/raw/*-ubyte[.gz]`,
  `cifar-10-batches-py/`, ...); `cifar10` also accepts `cifar10/cifar10_uint8.npz`;
- `npz:<file>`: arrays x_train, y_train, x_test, y_test;
- `imagefolder:<dir>`: `<dir>/train/<class>/*` and `<dir>/test/<class>/*` images.

A node needs only its own arrays (its partition, the public slice, its test share): `node_data`
cuts them and keeps them in an on-disk cache, so a deployed node, whose every message runs in a
fresh process, does not load the dataset and derive the split again per message (see "a node's
own arrays" below for the key, the location and how a bad file is handled).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fl_app.results import atomic_write_bytes
from fl_app.seeds import numpy_rng, torch_generator

DATASET_NAMES = ("synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100", "npz:<file>",
                 "imagefolder:<dir>")
PARTITIONS = ("iid", "dirichlet", "shards")


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says what to fix."""


class DataWarning(UserWarning):
    """Something in a dataset was skipped (e.g. files that are not images); the message counts it."""


@dataclass(frozen=True)
class Dataset:
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, 0-255 scale, from the training images
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() - mean) / std


# --- loading ---------------------------------------------------------------------------


@lru_cache(maxsize=2)
def load_dataset(name: str, data_dir: str = "", seed: int = 0) -> Dataset:
    """Load `name` (see module doc). Cached: simulated clients in one process share it."""
    if name == "synthetic":
        return make_synthetic(seed=seed)
    if name in ("mnist", "fashion-mnist"):
        folder = "MNIST" if name == "mnist" else "FashionMNIST"
        return _from_arrays(*_read_idx_folder(_data_path(data_dir, name) / folder / "raw", name))
    if name in ("cifar10", "cifar100"):
        return _from_arrays(*_read_cifar(_data_path(data_dir, name), name))
    if name.startswith("npz:"):
        return _from_arrays(*_read_npz(Path(name[4:]).expanduser()))
    if name.startswith("imagefolder:"):
        return _from_arrays(*_read_imagefolder(Path(name[12:]).expanduser()))
    raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")


def _data_path(data_dir: str, name: str) -> Path:
    if not data_dir:
        raise DataError(f"dataset {name!r} needs run-config key data-dir (the folder that holds it); "
                        "e.g. --run-config \"data-dir='/abs/path/to/data'\"")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data-dir {data_dir!r} is not a folder (resolved to {path.resolve()}); "
                        "give an absolute path to the folder that holds the dataset")
    return path


def _missing(name: str, where: Path, expected: str) -> DataError:
    return DataError(f"dataset {name!r} not found offline: expected {expected} in {where}. Put the "
                     f"files there (torchvision's layout: run torchvision.datasets' download=True on a "
                     f"machine with internet and copy the folder), or use dataset='npz:<file>'")


def _read_idx_folder(raw: Path, name: str) -> tuple:
    def read(stem: str, ndim: int) -> np.ndarray:
        for candidate in (raw / stem, raw / f"{stem}.gz"):
            if candidate.exists():
                return read_idx(candidate, ndim)
        raise _missing(name, raw, f"{stem}[.gz]")

    x_tr = read("train-images-idx3-ubyte", 3)
    y_tr = read("train-labels-idx1-ubyte", 1)
    x_te = read("t10k-images-idx3-ubyte", 3)
    y_te = read("t10k-labels-idx1-ubyte", 1)
    return x_tr[:, None], y_tr, x_te[:, None], y_te, f"{name} in {raw}"


def _redownload(path: Path) -> str:
    return f"replace {path.name} with a fresh copy (download it again and check its size)"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (LeCun's MNIST format: magic 0x00 0x00 0x08 ndim, then ndim
    big-endian uint32 sizes, then the bytes), gzipped or not, shaped as its header says.

    Raises DataError naming the file when it cannot be decompressed, its header is not an idx
    header of `ndim` dimensions (3: images, 1: labels), or it holds fewer or more bytes than the
    header promises (a truncated download)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                blob = f.read()
        else:
            blob = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut .gz raises EOFError
        raise DataError(f"{path}: cannot be read ({exc}); {_redownload(path)}") from None
    header = 4 + 4 * ndim
    if len(blob) < header or blob[:4] != bytes((0, 0, 0x08, ndim)):
        raise DataError(f"{path}: not an idx file of unsigned bytes with {ndim} dimension(s) "
                        f"({_describe(blob)}); {_redownload(path)}")
    shape = tuple(int(d) for d in np.frombuffer(blob, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(blob) - header != expected:
        raise DataError(f"{path}: its header promises {' x '.join(map(str, shape))} = {expected} bytes of data but "
                        f"the file holds {len(blob) - header} (truncated or padded); {_redownload(path)}")
    return np.frombuffer(blob, np.uint8, offset=header).reshape(shape)


def _describe(blob: bytes) -> str:
    """What a file that is not what it should be holds, in a few words."""
    if not blob:
        return "the file is empty"
    head = blob[:64].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "it is an HTML page, e.g. a download site's error page saved under this name"
    return f"it starts with {blob[:8]!r}"


def _read_cifar(root: Path, name: str) -> tuple:
    if name == "cifar10" and not (root / "cifar-10-batches-py").exists():
        npz = root / "cifar10" / "cifar10_uint8.npz"
        if npz.exists():
            return _read_npz(npz)
    folder, train, test, label = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
    }[name]

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            path = root / folder / f
            if not path.exists():
                raise _missing(name, root / folder, f)
            x, y = read_cifar_batch(path, label)
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    return (*read(train), *read(test), f"{name} in {root / folder}")


def _numpy_core(module: str, attr: str) -> object:
    """numpy's own array-rebuilding function `attr` (numpy >= 2 keeps numpy 1's numpy.core as numpy._core)."""
    import importlib

    return getattr(importlib.import_module(f"numpy._core.{module}"), attr)


# What a CIFAR batch's pickle may build: numpy arrays (with their dtypes and scalars; protocol 5 rebuilds
# them with _frombuffer) and bytes from Python 3's protocol-2 pickles. Dicts, lists, str, bytes and
# numbers need no global. Each entry is a constructor of data that calls nothing given by the file.
_CIFAR_GLOBALS = {
    **{(f"{package}.{module}", attr): lambda module=module, attr=attr: _numpy_core(module, attr)
       for package in ("numpy.core", "numpy._core")
       for module, attr in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle that asks for something a CIFAR batch never holds (a function to call, a class)."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles data only: any global outside `_CIFAR_GLOBALS` is refused before it is imported, so a
    crafted file (`__reduce__` -> os.system, ...) runs nothing (Python's "Restricting Globals" recipe)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return _CIFAR_GLOBALS[module, name]()


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one batch file of the CIFAR authors' python
    version (a pickled dict with b"data" (N, 3072) and `label_key`), read by a restricted unpickler.

    Raises DataError naming the file when it asks to run code or build objects a batch never holds
    (it is refused, never executed), is empty, truncated, not a pickle (an HTML error page), or
    does not hold a batch's arrays."""
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(f"{path}: refused, not loaded: the file asks to call or build {exc}, which a CIFAR batch "
                        "never holds (arrays, lists, bytes and numbers only); it may be crafted to run code: "
                        f"delete it and {_redownload(path)}") from None
    except Exception as exc:  # noqa: BLE001 - a cut or foreign pickle raises many kinds; each means the same
        blob = path.read_bytes()[:64] if path.is_file() else b""
        raise DataError(f"{path}: not a readable CIFAR batch ({_describe(blob)}; {type(exc).__name__}: {exc}); "
                        f"{_redownload(path)}") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    try:
        y = np.asarray(labels, np.int64)
    except (TypeError, ValueError):
        y = None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or y is None \
            or y.shape != (len(data),):
        found = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: not a CIFAR batch (expected a dict with b'data' of shape (N, 3072) and N "
                        f"{label_key!r}; found {found}); {_redownload(path)}")
    return np.asarray(data, np.uint8).reshape(-1, 3, 32, 32), y


def _read_npz(path: Path) -> tuple:
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist; give the path to a .npz with arrays "
                        "x_train, y_train, x_test, y_test")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise DataError(f"{path}: missing arrays {sorted(missing)}; it has {sorted(z.files)}")
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a cut zip raises BadZipFile, an empty file EOFError, ...
        with open(path, "rb") as f:
            head = f.read(64)
        raise DataError(f"{path}: not a readable .npz file ({_describe(head)}; {type(exc).__name__}: {exc}); "
                        "write it again with np.savez (arrays x_train, y_train, x_test, y_test)") from None
    return (*arrays, str(path))


IMAGE_NOTE = "images in any format Pillow reads (PNG, JPEG, BMP, ...)"


def _hidden(name: str) -> bool:
    """Entries tools leave behind: dot files and folders (.DS_Store, .ipynb_checkpoints, ._x.png)
    and macOS archive folders (__MACOSX)."""
    return name.startswith(".") or name == "__MACOSX"


def _read_imagefolder(root: Path) -> tuple:
    """`train/<class>/...` and `test/<class>/...` images (subfolders of a class included), 32x32 RGB.

    Hidden entries are ignored; any other file that is not a readable image is skipped, and all
    skipped files are reported in one DataWarning that counts them.
    """
    from PIL import Image, UnidentifiedImageError

    skipped: list[Path] = []

    def images(folder: Path) -> list[Path]:
        found = []
        for path in sorted(folder.rglob("*")):
            if any(_hidden(part) for part in path.relative_to(folder).parts) or path.is_dir():
                continue
            found.append(path)
        return found

    def read(split: str, classes: list[str] | None) -> tuple:
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"imagefolder {root}: missing {split}/ (expected {split}/<class>/<image>)")
        present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))
        skipped.extend(sorted(p for p in folder.iterdir() if not p.is_dir() and not _hidden(p.name)))  # no class
        if classes is not None:
            extra = [c for c in present if c not in classes]
            if extra:
                raise DataError(f"imagefolder {root}: class folders {', '.join(f'{split}/{c}' for c in extra)} are "
                                f"not in train/ (classes {', '.join(classes)}); their images would be scored "
                                "against a class no model learns: add them to train/ or remove them")
        names = classes or present
        xs, ys = [], []
        for label, cls in enumerate(names):
            count = 0
            for f in images(folder / cls) if (folder / cls).is_dir() else []:
                try:
                    with Image.open(f) as img:
                        xs.append(_image_rgb(img, f))
                except DataError:
                    raise
                except (UnidentifiedImageError, OSError, ValueError):
                    skipped.append(f)
                    continue
                ys.append(label)
                count += 1
            if classes is None and count == 0:
                raise DataError(f"imagefolder {root}: class folder {split}/{cls} holds no images ({IMAGE_NOTE}); "
                                "add images or remove the folder, or its label would never occur")
        if not xs:
            raise DataError(f"imagefolder {folder}: no images found in class folders ({IMAGE_NOTE})")
        return np.stack(xs), np.asarray(ys), names

    x_tr, y_tr, classes = read("train", None)
    x_te, y_te, _ = read("test", classes)
    if skipped:
        examples = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        warnings.warn(f"imagefolder {root}: skipped {len(skipped)} files that are not readable images "
                      f"(e.g. {examples}{'' if len(skipped) <= 3 else ', ...'})", DataWarning, stacklevel=2)
    return x_tr, y_tr, x_te, y_te, str(root)


# --- pixels: layouts and encodings --------------------------------------------------------
#
# Images are stored as uint8 0..255, (N, C, H, W). What users store is detected per split and
# converted exactly (every value of a uint8 image that went through the encoding comes back):
#
#   layout:   (N, H, W) grey, (N, C, H, W), (N, H, W, C), C = 1 (grey) or 3 (RGB)
#   encoding: uint8 / integers 0..255; 16-bit integers 0..65535 (v * 255 / 65535, rounded);
#             booleans (0 / 255); floats 0..1 (v * 255), -1..1 (torchvision's Normalize((0.5,), (0.5,)):
#             (v + 1) * 127.5) and 0..255, rounded
#
# Anything else is refused with what was found: flattened rows, 2 or 4 channels, an ambiguous channel
# axis, negative or > 65535 integers, integers of 10-12 bits, floats outside those ranges (e.g.
# standardized by a mean and std), NaN or infinite values, and splits encoded differently.

PIXEL_ENCODINGS = {  # name -> the value range mapped linearly onto 0..255
    "uint8": (0.0, 255.0), "16-bit": (0.0, 65535.0), "boolean": (0.0, 1.0),
    "float 0..1": (0.0, 1.0), "float -1..1": (-1.0, 1.0), "float 0..255": (0.0, 255.0)}
STORE_HINT = "store uint8 0..255 (or floats 0..1) images"


def _image_rgb(img, path: Path) -> np.ndarray:
    """A PIL image as uint8 RGB (3, 32, 32). 16-bit grey (PNG/TIFF mode "I;16*") is scaled from 0..65535
    (Pillow's convert("RGB") would clip every value above 255 to white); 32-bit integer or float
    images ("I", "F") have no fixed full scale and are refused naming the file."""
    if img.mode.startswith("I;16"):
        grey = np.asarray(img.convert("I").resize((32, 32)), np.float64).clip(0, 65535)
        return np.repeat(_to_uint8(grey, "16-bit")[None], 3, axis=0)
    if img.mode in ("I", "F"):
        raise DataError(f"{path}: a 32-bit {'integer' if img.mode == 'I' else 'float'} image (mode {img.mode}) has "
                        "no fixed full scale to map onto 0..255; save it as an 8-bit or 16-bit image")
    return np.asarray(img.convert("RGB").resize((32, 32))).transpose(2, 0, 1)


def _as_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """`x` as (N, C, H, W) with C = 1 or 3, or a DataError naming the shape found."""
    if x.ndim == 2 and len(x):
        side = math.isqrt(x.shape[1])
        guess = f" (if grey {side}x{side} images: x.reshape(-1, {side}, {side}))" if side * side == x.shape[1] else ""
        raise DataError(f"{what}: shape {x.shape} looks like flattened images; reshape them to (N, H, W) or "
                        f"(N, H, W, C){guess}: the pixel order of colour rows cannot be guessed")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{what}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {x.shape}")
    first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if first and last and x.shape[1:] != (1, 1, 1):
        raise DataError(f"{what}: shape {x.shape} is ambiguous: channels could be axis 1 ({x.shape[1]}) or axis 3 "
                        f"({x.shape[3]}); store (N, C, H, W) or (N, H, W, C) images larger than 3 pixels")
    if last and not first:
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        channels = 4 if 4 in (x.shape[1], x.shape[3]) else None
        hint = "; 4 channels are RGBA (or CMYK): keep RGB, e.g. x[..., :3]" if channels else ""
        raise DataError(f"{what}: images need 1 (grey) or 3 (RGB) channels, got shape {x.shape}{hint}")
    if len(x) == 0:
        raise DataError(f"{what}: no examples (0 rows); every split needs at least one")
    kind = x.dtype.kind
    if kind not in "biuf":
        raise DataError(f"{what}: images must be numbers ({STORE_HINT}), got dtype {x.dtype}")
    if kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{what}: {bad} pixel values are NaN or infinite; clean or drop those images")
    return x


def pixel_encoding(x: np.ndarray, what: str, integer_peak: int | None = None) -> str:
    """The key of PIXEL_ENCODINGS that `x`'s values are in, or a DataError saying what was found.

    `integer_peak`: the largest value of every integer split of the dataset (default: this one's),
    so that a 16-bit dataset whose test split happens to stay below 256 is read as 16-bit too."""
    if x.dtype == np.bool_:
        return "boolean"
    low, high = x.min().item(), x.max().item()
    found = f"{x.dtype} pixels from {low:g} to {high:g}"
    if x.dtype.kind in "iu":
        peak = high if integer_peak is None else integer_peak
        if low < 0:
            raise DataError(f"{what}: {found}: negative integers are not pixel intensities; {STORE_HINT}")
        if peak <= 255:
            return "uint8"
        if 4096 <= peak <= 65535:
            return "16-bit"
        depth = "10- or 12-bit sensor data" if peak < 4096 else "more than 16 bits"
        raise DataError(f"{what}: {found}: more than 8-bit but {depth}, whose full scale cannot be known; "
                        f"scale them to 0..255 (uint8) or 0..65535 (uint16) first")
    if low >= 0 and high <= 1:
        return "float 0..1"
    if low >= -1 and high <= 1:
        return "float -1..1"
    if low >= 0 and high <= 255:
        return "float 0..255"
    looks = " (it looks standardized, e.g. by transforms.Normalize(mean, std))" if low < 0 else ""
    raise DataError(f"{what}: {found}, which is none of 0..1, -1..1 or 0..255{looks}; store the images "
                    f"before normalizing: {STORE_HINT}")


def _to_uint8(x: np.ndarray, encoding: str) -> np.ndarray:
    """`x` (values in PIXEL_ENCODINGS[encoding]) as uint8 0..255, rounded to the nearest level."""
    if encoding != "uint8":
        low, high = PIXEL_ENCODINGS[encoding]
        x = np.rint((x.astype(np.float64) - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
    return np.require(x, np.uint8, requirements=["C", "W"])  # a writable copy if needed: torch shares it


def _labels(y: np.ndarray, what: str, num_images: int) -> np.ndarray:
    """Class indices 0..C-1 as int64, or a DataError naming the split and the bad values. Whole-number
    floats (0.0, 1.0, ...) are read as indices, with a DataWarning that says so."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{what}: labels have shape {y.shape}; they must be class indices of shape "
                        f"({num_images},), not one-hot or per-pixel (for one-hot rows use y.argmax(1))")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{what}: labels must be integer class indices, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.unique(y[~np.isfinite(y) | (y != np.round(y))]) if len(y) else y
        if len(bad):
            raise DataError(f"{what}: labels must be integer class indices; {_few(bad)} are not whole numbers")
        warnings.warn(f"{what}: labels are {y.dtype} whole numbers; read as integer class indices "
                      f"(store them as integers to silence this)", DataWarning, stacklevel=4)
    negative = np.unique(y[y < 0])
    if len(negative):
        raise DataError(f"{what}: {int(np.count_nonzero(y < 0))} labels are negative ({_few(negative)}); "
                        "labels must be class indices 0..C-1: fix or drop those rows")
    return y.astype(np.int64)


def _few(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit].tolist())
    return shown + (f", ... ({len(values)} distinct)" if len(values) > limit else "")


def _check_classes(y_tr: np.ndarray, y_te: np.ndarray, source: str) -> None:
    """Refuse splits a run cannot learn or score honestly: a split of one class (e.g. the first rows
    of a class-sorted file: the run would report accuracy 1.0), test classes the training split lacks
    (never learned); warn when the test split lacks training classes, or class indices below the
    largest never occur (labels 1..N: the model gets N+1 outputs, class 0 unused)."""
    train, test = np.unique(y_tr), np.unique(y_te)
    for split, classes, n in (("y_train", train, len(y_tr)), ("y_test", test, len(y_te))):
        if len(classes) == 1:
            raise DataError(f"{source} {split}: all {n} labels are class {classes[0]}; a run on one class learns "
                            "nothing and scores 1.0 (was a class-sorted file cut, e.g. x[:800]?): shuffle before "
                            "cutting, or give every split examples of at least two classes")
    unseen = np.setdiff1d(test, train)
    if len(unseen):
        raise DataError(f"{source}: y_test holds classes {_few(unseen)} that no training example has; no model "
                        "learns them: add training examples of them or drop those test rows")
    untested = np.setdiff1d(train, test)
    if len(untested):
        warnings.warn(f"{source}: y_test lacks classes {_few(untested)} of y_train ({len(test)} of {len(train)} "
                      "classes): accuracy measures the others only", DataWarning, stacklevel=3)
    unused = np.setdiff1d(np.arange(train.max() + 1), train)
    if len(unused):
        warnings.warn(f"{source}: labels run from {train.min()} to {train.max()} with no example of class "
                      f"{_few(unused)}; the model gets {train.max() + 1} outputs, {len(unused)} never used "
                      "(renumber the labels 0..C-1 to drop them)", DataWarning, stacklevel=3)


def _from_arrays(x_tr, y_tr, x_te, y_te, source: str, check_classes: bool = True) -> Dataset:
    """Every property assumed of one split is checked on each: image layout and channels, pixel
    encoding (converted to uint8 exactly, or refused), finite pixels, at least one example, one integer
    label >= 0 per image; the splits agree on image shape and pixel encoding; and (`check_classes`)
    on their classes (`_check_classes`)."""
    x_tr, x_te = _as_nchw(np.asarray(x_tr), f"{source} x_train"), _as_nchw(np.asarray(x_te), f"{source} x_test")
    y_tr, y_te = np.asarray(y_tr), np.asarray(y_te)
    y_tr, y_te = _labels(y_tr, f"{source} y_train", len(x_tr)), _labels(y_te, f"{source} y_test", len(x_te))
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataError(f"{source}: {len(x_tr)} train images but {len(y_tr)} labels, "
                        f"{len(x_te)} test images but {len(y_te)} labels")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{source}: train images {x_tr.shape[1:]} and test images {x_te.shape[1:]} differ")
    peak = max((int(x.max()) for x in (x_tr, x_te) if x.dtype.kind in "iu"), default=None)
    encodings = [pixel_encoding(x, f"{source} {name}", peak) for x, name in ((x_tr, "x_train"), (x_te, "x_test"))]
    if PIXEL_ENCODINGS[encodings[0]] != PIXEL_ENCODINGS[encodings[1]]:
        raise DataError(f"{source}: x_train pixels are {encodings[0]} but x_test pixels {encodings[1]}; "
                        "encode both splits alike (e.g. both uint8 0..255, or both floats 0..1)")
    if check_classes:
        _check_classes(y_tr, y_te, source)
    x_tr, x_te = _to_uint8(x_tr, encodings[0]), _to_uint8(x_te, encodings[1])
    num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    xf = torch.from_numpy(x_tr).float()
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).clamp_min(1.0).tolist())
    return Dataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr),
                   torch.from_numpy(x_te), torch.from_numpy(y_te), num_classes, mean, std)


def make_synthetic(num_classes: int = 10, train_size: int = 6000, test_size: int = 1000,
                   shape: tuple[int, int, int] = (3, 32, 32), noise: float = 3.0, seed: int = 0) -> Dataset:
    """A learnable image task: each class is a smooth random prototype, seen shifted and noisy.

    The prototypes are random low-frequency patterns; an example is its class's
    prototype at a random contrast, plus a fainter-or-equal prototype of another class
    as a distractor, rolled by up to 4 pixels, under Gaussian noise. A model must learn
    shift-tolerant features, and accuracy climbs over several rounds instead of
    saturating at once.
    """
    g = torch_generator(1000 + seed)
    c, h, w = shape
    protos = F.interpolate(torch.randn(num_classes, c, h // 8, w // 8, generator=g), size=(h, w),
                           mode="bicubic", align_corners=False)
    protos = protos / protos.flatten(1).std(1).view(-1, 1, 1, 1)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_classes, (n,), generator=g)
        other = (y + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
        x = (protos[y] * (0.5 + torch.rand(n, 1, 1, 1, generator=g))
             + protos[other] * torch.rand(n, 1, 1, 1, generator=g))
        shifts = torch.randint(-4, 5, (n, 2), generator=g)
        x = torch.stack([xi.roll((int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
        x = x + noise * torch.randn(x.shape, generator=g)
        return (128 + 40 * x).clamp(0, 255).to(torch.uint8), y

    x_tr, y_tr = sample(train_size)
    x_te, y_te = sample(test_size)
    # Classes are drawn uniformly: a tiny set made for a test may miss some, which is no user's mistake.
    return _from_arrays(x_tr.numpy(), y_tr.numpy(), x_te.numpy(), y_te.numpy(), "synthetic", check_classes=False)


# --- public slice and partitions ---------------------------------------------------------


def split_public(num_train: int, public_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(public indices, private indices): a fixed seeded slice every party can derive itself."""
    if not 0 <= public_size < num_train:
        raise DataError(f"public-size {public_size} must be in [0, {num_train}): the public slice is held out of "
                        f"this dataset's {num_train} training examples, and the nodes need some; lower public-size")
    perm = numpy_rng(seed + 7).permutation(num_train)
    return np.sort(perm[:public_size]), np.sort(perm[public_size:])


def evaluation_indices(num_test: int, test_size: int, seed: int) -> np.ndarray:
    """The test examples a run evaluates on: all (`test_size` 0 or >= the test set), else a seeded
    random subset (never the first rows: stored datasets are often sorted by class). The server
    scores the global model on it; node i of n scores its submodel on every n-th of it, from i."""
    if not test_size or test_size >= num_test:
        return np.arange(num_test)
    return np.sort(numpy_rng(seed + 11).permutation(num_test)[:test_size])


def partition(labels: np.ndarray, num_partitions: int, scheme: str = "iid", seed: int = 0,
              alpha: float = 0.5, shards_per_client: int = 2) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 among clients; seeded, so every node computes the same split.

    - iid: a shuffled even split;
    - dirichlet: per class, proportions drawn from Dir(alpha) (small alpha = skewed);
    - shards: sort by label, cut into 2x... shards, give each client `shards_per_client`.
    """
    rng = numpy_rng(seed)
    n = len(labels)
    if num_partitions < 1 or num_partitions > n:
        raise DataError(f"cannot split {n} examples into {num_partitions} partitions: use fewer nodes, a smaller "
                        "public-size, or a larger training set")
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_partitions)]
    if scheme == "dirichlet":
        return _dirichlet(labels, num_partitions, alpha, rng)
    if scheme == "shards":
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, num_partitions * shards_per_client)
        owner = rng.permutation(len(shards))
        return [np.sort(np.concatenate([shards[s] for s in owner[i::num_partitions]]))
                for i in range(num_partitions)]
    raise DataError(f"unknown partition {scheme!r}; valid: {', '.join(PARTITIONS)}")


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    # Redraw until every client has at least one example (almost always at once).
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(k)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * k)) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if all(parts):
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(f"dirichlet-alpha {alpha} leaves some of {k} clients without data: raise dirichlet-alpha "
                    "(e.g. 0.1), use fewer nodes, or partition = 'iid'")


# --- batches -----------------------------------------------------------------------------


class Batches:
    """Normalized, optionally augmented mini-batches of a uint8 image set."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, dataset: Dataset, batch_size: int,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.x, self.y, self.dataset = x, y, dataset
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return len(self.y)

    def epoch(self, epoch: int, augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch_generator(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.y), generator=g) if self.shuffle else torch.arange(len(self.y))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            x = self.dataset.normalize(self.x[idx])
            if augment:
                x = augment_batch(x, g)
            yield x, self.y[idx]


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip, for the whole batch at once."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


# --- the federated split every party derives alike ------------------------------------------


@dataclass(frozen=True)
class FederatedSplit:
    public: np.ndarray  # indices into x_train: the public slice (REFT's distillation set)
    clients: tuple[np.ndarray, ...]  # indices into x_train, one array per partition


@lru_cache(maxsize=8)
def federated_split(dataset: Dataset, num_partitions: int, scheme: str, seed: int, alpha: float,
                    shards_per_client: int, public_size: int, max_client_examples: int) -> FederatedSplit:
    """Hold out the public slice, split the rest among clients, optionally cap each client.

    The public slice is held out for every strategy, so all strategies train on the
    same private data and compare fairly.
    """
    public, private = split_public(len(dataset.y_train), public_size, seed)
    parts = partition(dataset.y_train.numpy()[private], num_partitions, scheme, seed, alpha, shards_per_client)
    clients = []
    for part in parts:
        idx = private[part]
        if max_client_examples:
            idx = np.sort(numpy_rng(seed + len(clients)).permutation(idx)[:max_client_examples])
        clients.append(idx)
    return FederatedSplit(public, tuple(clients))


# --- a node's own arrays, cached on disk -----------------------------------------------------
#
# A deployed SuperNode runs every message in a fresh ClientApp process: without a cache each one
# loads the whole dataset (generating `synthetic` takes seconds) and derives the split again, to
# keep a few of its rows. `node_data` derives them once and keeps them in `<cache dir>/node-<h>.npz`,
# `h` the SHA-256 of a key holding everything that determines them: this module's source (the
# split and the generator are code), the torch and numpy versions, the dataset name and data-dir,
# path + size + mtime of every file the dataset is read from, seed, partition scheme,
# dirichlet-alpha, shards-per-client, num-partitions, partition-id, public-size,
# max-client-examples and test-size. The file stores its key and is used only if the key matches
# and every array has the dtype and shape it must have; a truncated, corrupt or foreign file is
# derived again and replaced, never trusted. Writes are atomic (a temporary file in the same
# folder, fsynced, then renamed), so concurrent nodes leave one valid file. A folder that cannot
# be written only costs the cache. When a new entry is written, entries older than
# CACHE_MAX_AGE_DAYS are removed, then the oldest while the folder holds more than CACHE_MAX_BYTES
# (a simulation writes one entry per node and run configuration too).
#
# Location: node-config `cache-dir`, else environment variable FL_APP_CACHE_DIR, else
# $XDG_CACHE_HOME/fl-app/nodes (~/.cache/fl-app/nodes); the value "off" turns the cache off.

CACHE_ENV = "FL_APP_CACHE_DIR"
CACHE_OFF = "off"
CACHE_FORMAT = 1
CACHE_MAX_AGE_DAYS = 30
CACHE_MAX_BYTES = 2 * 2**30
LOG = logging.getLogger("fl_app.data")


@dataclass(frozen=True)
class NodeData:
    """The rows of the dataset one node uses: its partition, the public slice, its test share."""

    x_train: torch.Tensor  # this node's partition (split.clients[partition_id]), uint8 (N, C, H, W)
    y_train: torch.Tensor
    x_public: torch.Tensor  # the public slice (split.public, in that order)
    x_test: torch.Tensor  # this node's test share: evaluation_indices(...)[partition_id::num_partitions]
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # the whole training set's, as in Dataset
    std: tuple[float, ...]

    image_shape = Dataset.image_shape
    normalize = Dataset.normalize  # the same arithmetic as the full dataset's


def resolve_cache_dir(value: str | None = None) -> str:
    """The node cache folder: `value` (node-config `cache-dir`), else $FL_APP_CACHE_DIR, else
    $XDG_CACHE_HOME/fl-app/nodes; "" when the chosen value is "off"."""
    chosen = value if value is not None else os.environ.get(CACHE_ENV)
    if chosen is None or chosen == "":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "fl-app", "nodes")
    return "" if chosen.strip().lower() == CACHE_OFF else os.path.expanduser(chosen)


# Datasets this process's memos hold, with their files as loaded ([path, size, mtime_ns] each).
_HELD: dict[tuple[str, str, int], list] = {}


def forget_held_data() -> None:
    """Empty this process's memos of datasets, splits and node rows (the next node reads the disk)."""
    _HELD.clear()
    node_data.cache_clear()
    load_dataset.cache_clear()
    federated_split.cache_clear()


@lru_cache(maxsize=32)
def node_data(dataset: str, data_dir: str, seed: int, num_partitions: int, partition_id: int, scheme: str,
              alpha: float, shards_per_client: int, public_size: int, max_client_examples: int, test_size: int,
              cache: str = "") -> NodeData:
    """Node `partition_id`'s arrays, from the cache folder `cache` ("" = no cache) when it holds them,
    else derived (`derive_node_data`) and stored there. Equal to a fresh derivation either way."""
    args = (dataset, data_dir, seed, num_partitions, partition_id, scheme, alpha, shards_per_client, public_size,
            max_client_examples, test_size)
    held = (dataset, data_dir, seed)
    if not cache or (held in _HELD and _HELD[held] == _source_files(dataset, data_dir)):
        # This process already holds the dataset, loaded from the files as they are now: a long-lived
        # process serving many nodes (a simulation) cuts every node's rows from memory, and writes no
        # cache entry per node; the disk cache is for a node's fresh process per message.
        return derive_node_data(*args)
    key = node_cache_key(*args)
    if key is None:
        return derive_node_data(*args)
    path = Path(cache) / f"node-{hashlib.sha256(key.encode()).hexdigest()[:40]}.npz"
    found = read_node_cache(path, key)
    if found is not None:
        return found
    # What is stored under `key` is read from the files `key` describes: loaded afresh into this
    # process's memos (which may predate a change to them), and not stored if they changed meanwhile.
    load_dataset.cache_clear()
    federated_split.cache_clear()
    data = derive_node_data(*args)
    if node_cache_key(*args) != key:
        return data
    _HELD[held] = json.loads(key)["sources"]
    try:
        write_node_cache(path, key, data)
    except OSError as exc:  # a read-only or full disk costs the cache, not the run
        LOG.warning("node data cache not written (%s): %s", path, exc)
    return data


def derive_node_data(dataset: str, data_dir: str, seed: int, num_partitions: int, partition_id: int, scheme: str,
                     alpha: float, shards_per_client: int, public_size: int, max_client_examples: int,
                     test_size: int, fresh: bool = False) -> NodeData:
    """Load the dataset, derive the federated split and cut this node's rows (no disk cache); `fresh`
    bypasses the in-process memos of `load_dataset` and `federated_split` (and does not fill them)."""
    load, split_of = (load_dataset.__wrapped__, federated_split.__wrapped__) if fresh else (load_dataset, federated_split)
    d = load(dataset, data_dir, seed)
    split = split_of(d, num_partitions, scheme, seed, alpha, shards_per_client, public_size, max_client_examples)
    own = torch.from_numpy(split.clients[partition_id])
    test = torch.from_numpy(evaluation_indices(len(d.y_test), test_size, seed)[partition_id::num_partitions])
    return NodeData(d.x_train[own], d.y_train[own], d.x_train[torch.from_numpy(split.public)], d.x_test[test],
                    d.y_test[test], d.num_classes, d.mean, d.std)


def node_cache_key(dataset: str, data_dir: str, seed: int, num_partitions: int, partition_id: int, scheme: str,
                   alpha: float, shards_per_client: int, public_size: int, max_client_examples: int,
                   test_size: int) -> str | None:
    """The cache key (JSON) of a node's arrays; None when the dataset's files cannot be listed (the
    derivation then says what is missing)."""
    sources = _source_files(dataset, data_dir)
    if sources is None:
        return None
    return json.dumps({"format": CACHE_FORMAT, "code": _code_digest(), "torch": torch.__version__,
                       "numpy": np.__version__, "dataset": dataset, "data_dir": data_dir, "sources": sources,
                       "seed": seed, "partition": scheme, "dirichlet_alpha": alpha,
                       "shards_per_client": shards_per_client, "num_partitions": num_partitions,
                       "partition_id": partition_id, "public_size": public_size,
                       "max_client_examples": max_client_examples, "test_size": test_size}, sort_keys=True)


@lru_cache(maxsize=1)
def _code_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _source_files(dataset: str, data_dir: str) -> list[list] | None:
    """[path, size, mtime_ns] of every file `dataset` may be read from; None if there are none."""
    if dataset == "synthetic":
        return []
    folders = {"mnist": ("MNIST",), "fashion-mnist": ("FashionMNIST",), "cifar10": ("cifar-10-batches-py", "cifar10"),
               "cifar100": ("cifar-100-python",)}
    if dataset in folders:
        if not data_dir:
            return None
        roots = [Path(data_dir).expanduser() / f for f in folders[dataset]]
    elif dataset.startswith("npz:"):
        roots = [Path(dataset[4:]).expanduser()]
    elif dataset.startswith("imagefolder:"):
        roots = [Path(dataset[12:]).expanduser()]
    else:
        return None
    found = []
    try:
        for root in roots:
            if root.is_file():
                files = [root]
            else:  # a folder (every file under it), or nothing at all
                files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
            for f in files:
                st = f.stat()
                found.append([str(f), st.st_size, st.st_mtime_ns])
    except OSError:
        return None
    return found or None


_ARRAYS = {"x_train": (np.uint8, 4), "y_train": (np.int64, 1), "x_public": (np.uint8, 4), "x_test": (np.uint8, 4),
           "y_test": (np.int64, 1), "mean": (np.float64, 1), "std": (np.float64, 1), "num_classes": (np.int64, 0)}


def read_node_cache(path: Path, key: str) -> NodeData | None:
    """The arrays stored at `path` under `key`; None if the file is missing, is for another key, or is
    damaged in any way (it is then derived again and replaced)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"][()]) != key:
                return None
            a = {name: z[name] for name in _ARRAYS}
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt zip raises many kinds; none may stop the node
        LOG.warning("node data cache %s is unreadable (%s: %s); deriving it again", path, type(exc).__name__, exc)
        return None
    shapes_ok = (all(a[n].dtype == dt and a[n].ndim == nd for n, (dt, nd) in _ARRAYS.items())
                 and len(a["x_train"]) == len(a["y_train"]) and len(a["x_test"]) == len(a["y_test"])
                 and a["x_train"].shape[1:] == a["x_public"].shape[1:] == a["x_test"].shape[1:]
                 and len(a["mean"]) == len(a["std"]) == a["x_train"].shape[1])
    if not shapes_ok:
        LOG.warning("node data cache %s does not hold what its key promises; deriving it again", path)
        return None
    return NodeData(torch.from_numpy(a["x_train"]), torch.from_numpy(a["y_train"]), torch.from_numpy(a["x_public"]),
                    torch.from_numpy(a["x_test"]), torch.from_numpy(a["y_test"]), int(a["num_classes"]),
                    tuple(a["mean"].tolist()), tuple(a["std"].tolist()))


def write_node_cache(path: Path, key: str, data: NodeData) -> None:
    """Store `data` at `path` atomically: whoever reads it sees the old file, the new one or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), x_train=data.x_train.numpy(), y_train=data.y_train.numpy(),
             x_public=data.x_public.numpy(), x_test=data.x_test.numpy(), y_test=data.y_test.numpy(),
             mean=np.array(data.mean, np.float64), std=np.array(data.std, np.float64),
             num_classes=np.array(data.num_classes, np.int64))
    atomic_write_bytes(path, buffer.getvalue(), suffix=".tmp")  # ".tmp": what `_prune` clears after a crash
    _prune(path.parent, keep=path)


def _prune(folder: Path, keep: Path) -> None:
    """Remove entries (and temporary files of killed writers) older than CACHE_MAX_AGE_DAYS, then the
    oldest entries while all of them together exceed CACHE_MAX_BYTES (`keep`, just written, stays)."""
    limit = time.time() - CACHE_MAX_AGE_DAYS * 86400
    entries = []
    for p in list(folder.glob("node-*.npz")) + list(folder.glob(".node-*.tmp")):
        try:
            st = p.stat()
            if p != keep and st.st_mtime < limit:
                p.unlink()
            elif p.suffix == ".npz":
                entries.append((st.st_mtime, st.st_size, p))
        except OSError:
            pass  # removed meanwhile by another node
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= CACHE_MAX_BYTES:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size
