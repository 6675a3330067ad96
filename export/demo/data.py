"""The demo data set: scikit-learn's 1,797 real 8x8 handwritten digit scans (UCI "optdigits").

`sklearn.datasets.load_digits()` ships with scikit-learn, so nothing is downloaded. Each image is
8x8 pixels with integer ink values 0 (paper) .. 16 (full ink), label 0-9.

The split is deterministic: `TRAIN_SIZE` digits for training, stratified by label with
`sklearn.model_selection.train_test_split(random_state=SPLIT_SEED)`; the remaining
`1797 - TRAIN_SIZE` digits are "held out" and never trained on (the demo indexes and searches them).

One rendering (`render_digit`) serves both training and the PNG files: the trainer feeds the
rendered image through open_clip's eval transform, exactly as the serving stack does with a PNG.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")

TRAIN_SIZE = 1400
SPLIT_SEED = 0
MAX_INK = 16  # load_digits pixel values are integers in [0, 16] (UCI optdigits 4x4-block counts)
SOURCE_SIZE = 8  # load_digits images are 8x8
RENDER_SCALE = 16  # 8 px -> 128 px, nearest neighbour: every scan pixel becomes a 16x16 square
RENDER_SIZE = SOURCE_SIZE * RENDER_SCALE
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class DemoItem:
    """One digit of the demo data set.

    Attributes:
        source_index: row of `load_digits()` (0..1796), stable across runs.
        label: the digit, 0-9.
        split: "train" or "heldout".
        filename: PNG file name relative to the data set folder, `digit_<source_index:04d>_<label>.png`.
    """

    source_index: int
    label: int
    split: Split
    filename: str


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # float [1797, 8, 8], values 0..16
    labels = bunch.target.astype(np.int64)  # int [1797], 0..9
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All of `load_digits()`: (images float32 [1797, 8, 8] in [0, 16], labels int64 [1797] in 0..9).

    The arrays are read-only and shared between calls.
    """
    return _digits()


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    train, heldout = train_test_split(
        np.arange(len(labels)), train_size=TRAIN_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    out = {"train": np.sort(train), "heldout": np.sort(heldout)}
    for array in out.values():
        array.setflags(write=False)
    return out


def split_indices(split: Split) -> np.ndarray:
    """Sorted `load_digits()` row indices of `split`: int [1400] for "train", int [397] for "heldout".

    Deterministic (stratified by label, `random_state=SPLIT_SEED`); the two splits are disjoint and
    together cover all 1,797 rows.

    Raises:
        ValueError: `split` is not "train" or "heldout".
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    return _split_indices()[split]


def digit_filename(source_index: int, label: int) -> str:
    """The PNG file name of a digit: `digit_<source_index:04d>_<label>.png`."""
    return f"digit_{source_index:04d}_{label}.png"


def load_split(split: Split) -> list[DemoItem]:
    """The items of `split`, ordered by `source_index` (no files are written).

    Raises:
        ValueError: unknown split.
    """
    _, labels = _digits()
    items = []
    for index in split_indices(split).tolist():
        label = int(labels[index])
        items.append(DemoItem(index, label, split, digit_filename(index, label)))
    return items


def render_digit(pixels: np.ndarray) -> Image.Image:
    """Render one 8x8 scan as a 128x128 RGB image: dark ink on white paper, nearest-neighbour upscale.

    Args:
        pixels: array-like [8, 8] of ink values in [0, 16] (the `load_digits()` scale), any numeric dtype.

    Returns:
        PIL RGB image, 128x128; gray level = round(255 * (1 - ink / 16)) in all three channels,
        every scan pixel a 16x16 square.

    Raises:
        ValueError: wrong shape, non-finite values, or values outside [0, 16].
    """
    array = np.asarray(pixels, dtype=np.float64)
    if array.shape != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"render_digit expects an 8x8 array, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > MAX_INK:
        raise ValueError(f"render_digit expects ink values in [0, {MAX_INK}] (load_digits scale)")
    gray = np.rint(255.0 * (1.0 - array / MAX_INK)).astype(np.uint8)
    big = np.kron(gray, np.ones((RENDER_SCALE, RENDER_SCALE), dtype=np.uint8))  # uint8 [128, 128]
    return Image.fromarray(np.repeat(big[:, :, None], 3, axis=2), mode="RGB")


def render_item(item: DemoItem) -> Image.Image:
    """`render_digit` of the `load_digits()` row that `item` names."""
    images, _ = _digits()
    return render_digit(images[item.source_index])


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dataset(out_dir: Path | str, split: Split = "heldout") -> list[DemoItem]:
    """Write the digits of `split` as PNG files plus `metadata.jsonl` into `out_dir`.

    Files: one `digit_<source_index:04d>_<label>.png` (128x128 RGB, `render_digit`) per item and
    `metadata.jsonl`, one JSON object per line: {"filename", "label", "split", "source_index"}.
    Idempotent: existing PNGs with the right content are kept, others are (re)written atomically;
    other files in `out_dir` are left alone.

    Returns:
        The items written, ordered by `source_index`.

    Raises:
        ValueError: unknown split.
        OSError: `out_dir` cannot be created or written.
    """
    items = load_split(split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in items:
        path = out / item.filename
        image = render_item(item)
        if path.is_file():
            try:
                with Image.open(path) as existing:
                    if existing.mode == "RGB" and np.array_equal(np.asarray(existing), np.asarray(image)):
                        continue
            except OSError:
                pass  # unreadable file: rewrite it below
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    lines = [json.dumps(asdict(item), sort_keys=True) for item in items]
    _atomic_write_bytes(out / METADATA_FILE, ("\n".join(lines) + "\n").encode())
    return items


def read_metadata(out_dir: Path | str) -> list[DemoItem]:
    """Read `<out_dir>/metadata.jsonl` as written by `write_dataset`.

    Raises:
        FileNotFoundError: no metadata.jsonl in `out_dir`.
    """
    path = Path(out_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write the demo data set with write_dataset() first")
    return [DemoItem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
