"""Model repositories for the benchmarks: a cached random-weight export, and config variants of one ONNX file.

Random weights cost exactly what trained weights cost (same graph, same shapes, same kernels), so an
open_clip ViT-B-32 exported with random weights is the realistic cost model for the encoder benchmark and
needs no network. `batching_variants` writes a Triton model repository whose model folders all point
(symlink) at the same `model.onnx` with different `config.pbtxt` settings, so one server can serve, e.g.,
the same tower with and without dynamic batching side by side.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from vitrine.manifest import MANIFEST_FILE, Manifest
from vitrine.triton_config import check_batching, read_model_config, write_model_config

log = logging.getLogger(__name__)

DEFAULT_BENCH_MODEL = "ViT-B-32"
TOWERS = ("image", "text")
MODEL_FILENAME = "model.onnx"


def ensure_bench_repository(cache_dir: Path, model: str = DEFAULT_BENCH_MODEL) -> Path:
    """Return `<cache_dir>/bench/<model>/model_repository`, exporting it once with random weights.

    The export is `export.onnx_export.export_repository(model, ..., pretrained="random")` with the
    project's default Triton settings (as `vitrine export MODEL --pretrained random`); it needs torch and
    open_clip but no network (ViT-B-32: about 10-30 s on 2 cores). A repository that already holds a
    `manifest.json` is reused as it is.

    Args:
        cache_dir: cache root (e.g. `.cache`).
        model: open_clip model name.

    Returns:
        The model repository folder (manifest.json, tokenizer.json, `<prefix>_image/`, `<prefix>_text/`).

    Raises:
        export.ExportError: the export failed (unknown model name, ONNX check or parity gate).
    """
    repository = Path(cache_dir) / "bench" / model / "model_repository"
    if (repository / MANIFEST_FILE).is_file():
        return repository
    from export.onnx_export import export_repository  # noqa: PLC0415 - torch, open_clip: only when exporting

    log.info("exporting %s with random weights to %s (once)", model, repository)
    export_repository(model, repository, pretrained="random", overwrite=True)
    return repository


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model configuration of a tower in a variant repository (model name `<tower model>_<suffix>`).

    Attributes:
        suffix: model-name suffix, letters/digits/underscore (e.g. "batching", "nobatch").
        dynamic_batching: keep a `dynamic_batching` section (False removes it: every request executes alone).
        preferred_batch_sizes: replaces `dynamic_batching.preferred_batch_size` when not None (rows;
            () clears it).
        max_queue_delay_microseconds: replaces `dynamic_batching.max_queue_delay_microseconds` when not None.
        instance_count: replaces the instance group count (one ORT session per instance) when not None.
        intra_op_threads: sets the `intra_op_thread_count` config parameter (ORT threads per session).
        graph_level: sets `optimization.graph.level` (Triton onnxruntime backend: 0 = ORT_ENABLE_ALL,
            1 = EXTENDED, -1 = BASIC, 2 = DISABLE_ALL) when not None.
    """

    suffix: str
    dynamic_batching: bool = True
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_microseconds: int | None = None
    instance_count: int | None = None
    intra_op_threads: int | None = None
    graph_level: int | None = None

    def describe(self) -> str:
        """The settings that differ from the source config, e.g. "dynamic_batching=off instances=2"."""
        parts = [] if self.dynamic_batching else ["dynamic_batching=off"]
        if self.preferred_batch_sizes is not None:
            parts.append(f"preferred_batch_size={list(self.preferred_batch_sizes)}")
        if self.max_queue_delay_microseconds is not None:
            parts.append(f"max_queue_delay_microseconds={self.max_queue_delay_microseconds}")
        if self.instance_count is not None:
            parts.append(f"instances={self.instance_count}")
        if self.intra_op_threads is not None:
            parts.append(f"intra_op_thread_count={self.intra_op_threads}")
        if self.graph_level is not None:
            parts.append(f"graph_level={self.graph_level}")
        return " ".join(parts) or "as exported"


#: The two variants every encoder benchmark point runs: the exported config, and the same without batching.
BATCHING_ON_OFF: tuple[Variant, ...] = (Variant("batching"), Variant("nobatch", dynamic_batching=False))


def tower_model_dir(repository: Path, tower: str) -> Path:
    """The model folder of `tower` ("image" or "text") in a Vitrine model repository (from its manifest).

    Raises:
        ValueError: `tower` is neither "image" nor "text".
        FileNotFoundError: no manifest.json, or the manifest's model folder is missing.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    manifest = Manifest.read(repository)
    name = manifest.image.triton_model if tower == "image" else manifest.text.triton_model
    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} (the manifest's {tower} tower) does not exist")
    return model_dir


def latest_model_file(model_dir: Path, filename: str = MODEL_FILENAME) -> Path:
    """`<model_dir>/<highest numeric version>/<filename>` (Triton's default version policy).

    Raises:
        FileNotFoundError: no version folder holds `filename`.
    """
    versions = sorted((int(p.name), p / filename) for p in model_dir.iterdir()
                      if p.name.isdigit() and (p / filename).is_file())
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no <version>/{filename}")
    return versions[-1][1]


def batching_variants(repository: Path, out_dir: Path, variants: Sequence[Variant] = BATCHING_ON_OFF,
                      towers: Sequence[str] = ("image",)) -> Path:
    """Write a Triton model repository at `out_dir` with one model per (tower, variant).

    Each model folder `<out_dir>/<tower model>_<suffix>/` holds a `config.pbtxt` derived from the
    tower's exported config (name changed, the variant's settings applied, via
    `vitrine.triton_config.read_model_config` / `write_model_config`) and `1/model.onnx`, a symlink to the
    tower's ONNX file in `repository`, so every variant runs the same bytes. `out_dir` is replaced when it
    exists. The variant repository has no manifest (it is for the encoder server only).

    Args:
        repository: a Vitrine model repository (manifest.json + tower folders).
        out_dir: the variant repository to write.
        variants: the configurations; suffixes must be unique.
        towers: which towers ("image", "text").

    Returns:
        `out_dir`.

    Raises:
        ValueError: duplicate or empty suffix, unknown tower, or invalid batching settings (e.g. a preferred
            batch size above max_batch_size; `vitrine.triton_config.check_batching`).
        FileNotFoundError: the repository lacks a manifest, a tower folder or its ONNX file.
    """
    suffixes = [v.suffix for v in variants]
    if len(set(suffixes)) != len(suffixes) or not all(s and s.replace("_", "").isalnum() for s in suffixes):
        raise ValueError(f"variant suffixes must be unique, non-empty [A-Za-z0-9_]: {suffixes}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for tower in towers:
        source_dir = tower_model_dir(repository, tower)
        source = read_model_config(source_dir)
        onnx_file = latest_model_file(source_dir, source.default_model_filename or MODEL_FILENAME).resolve()
        for variant in variants:
            config = type(source)()
            config.CopyFrom(source)
            config.name = f"{source.name or source_dir.name}_{variant.suffix}"
            config.default_model_filename = MODEL_FILENAME
            if not variant.dynamic_batching:
                config.ClearField("dynamic_batching")
            else:
                db = config.dynamic_batching
                if variant.preferred_batch_sizes is not None:
                    del db.preferred_batch_size[:]
                    db.preferred_batch_size.extend(variant.preferred_batch_sizes)
                if variant.max_queue_delay_microseconds is not None:
                    db.max_queue_delay_microseconds = variant.max_queue_delay_microseconds
            if variant.instance_count is not None:
                if not config.instance_group:
                    config.instance_group.add()
                del config.instance_group[1:]
                config.instance_group[0].count = variant.instance_count
            if variant.intra_op_threads is not None:
                config.parameters["intra_op_thread_count"].string_value = str(variant.intra_op_threads)
            if variant.graph_level is not None:
                config.optimization.graph.level = variant.graph_level
            check_batching(config.max_batch_size, list(config.dynamic_batching.preferred_batch_size),
                           config.dynamic_batching.max_queue_delay_microseconds,
                           sum(max(g.count, 1) for g in config.instance_group) or 1)
            model_dir = out_dir / config.name
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "1" / MODEL_FILENAME).symlink_to(onnx_file)
            warmup_dir = source_dir / "warmup"
            if warmup_dir.is_dir():
                (model_dir / "warmup").symlink_to(warmup_dir.resolve(), target_is_directory=True)
            write_model_config(config, model_dir)
    return out_dir
