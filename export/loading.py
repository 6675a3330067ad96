"""Load an open_clip model for export: weights (tag, local checkpoint or random), tokenizer, preprocessing.

Every `export/demo/*.json` is registered as an open_clip model config (`open_clip.add_model_config`)
before a model is created, so the demo model names work like built-in ones.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from export import ExportError

log = logging.getLogger(__name__)

DEMO_CONFIG_DIR = Path(__file__).resolve().parent / "demo"
RANDOM_LABEL = "random"
_registered: set[Path] = set()


def register_demo_configs() -> list[str]:
    """Register every `export/demo/*.json` with open_clip (once per file per process).

    Returns:
        The model names (file stems) now known to open_clip.
    """
    names = []
    for path in sorted(DEMO_CONFIG_DIR.glob("*.json")):
        if path not in _registered:
            open_clip.add_model_config(path)
            _registered.add(path)
        names.append(path.stem)
    return names


@dataclass(frozen=True)
class PreprocessConfig:
    """open_clip's eval image preprocessing for a model (from `model.visual.preprocess_cfg`).

    Attributes:
        image_size: (height, width) in pixels of the tower input.
        mean, std: per-channel RGB normalization of pixel values scaled to [0, 1].
        interpolation: resize filter ('bicubic', 'bilinear' or 'nearest').
        resize_mode: 'shortest' (resize shortest side, center crop), 'longest' (resize longest side,
            pad) or 'squash' (resize to size, aspect not kept).
        fill_color: pad value for resize_mode 'longest'.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    fill_color: int = 0

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "PreprocessConfig":
        """Read `model.visual.preprocess_cfg` (set by open_clip.create_model)."""
        cfg = PreprocessCfg(**model.visual.preprocess_cfg)
        size = cfg.size if isinstance(cfg.size, (tuple, list)) else (cfg.size, cfg.size)
        return cls(
            image_size=(int(size[0]), int(size[1])),
            mean=tuple(float(v) for v in cfg.mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg.std),  # type: ignore[arg-type]
            interpolation=str(cfg.interpolation),
            resize_mode=str(cfg.resize_mode),
            fill_color=int(cfg.fill_color),
        )

    def eval_transform(self) -> Any:
        """open_clip's eval transform (PIL image -> float32 [3, H, W], normalized)."""
        return image_transform_v2(
            PreprocessCfg(
                size=self.image_size,
                mean=self.mean,
                std=self.std,
                interpolation=self.interpolation,
                resize_mode=self.resize_mode,
                fill_color=self.fill_color,
            ),
            is_train=False,
        )


@dataclass
class LoadedModel:
    """An open_clip model ready for export.

    Attributes:
        model_name: open_clip model name.
        model: the CLIP model, eval mode, float32, on the CPU.
        tokenizer: the model's open_clip tokenizer (SimpleTokenizer or HFTokenizer).
        preprocess: its eval image preprocessing.
        pretrained: 'random', 'file:<checkpoint basename>' or the pretrained tag.
        weights_sha256: `state_dict_sha256(model)`, hex.
        context_length: text tokens per row.
    """

    model_name: str
    model: torch.nn.Module
    tokenizer: Any
    preprocess: PreprocessConfig
    pretrained: str
    weights_sha256: str
    context_length: int


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 (hex) over the raw bytes of every state_dict tensor, keys in sorted order.

    Only tensor bytes enter the hash (no names or shapes), so the same weights hash the same
    whatever their module path prefix order.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_model_name(model_name: str) -> None:
    if ":" in model_name:
        raise ExportError(
            f"model name {model_name!r}: 'hf-hub:' / 'local-dir:' schemas are not supported; pass an "
            "open_clip model name (e.g. ViT-B-32) and --checkpoint PATH for local weights"
        )
    if model_name not in open_clip.list_models():
        raise ExportError(
            f"unknown open_clip model {model_name!r}; known: {', '.join(open_clip.list_models()[:20])}, ... "
            "(see open_clip.list_models())"
        )


def load_open_clip(
    model_name: str,
    *,
    pretrained: str | None = None,
    checkpoint: Path | str | None = None,
) -> LoadedModel:
    """Create an open_clip model with its tokenizer and preprocessing.

    Args:
        model_name: open_clip model name ('ViT-B-32') or a demo config stem ('vitrine-digits-tiny').
        pretrained: an open_clip pretrained tag (downloaded through the HF hub, or read from its
            cache), or None / 'random' for random initialization (seeded by torch's global RNG).
        checkpoint: a local open_clip checkpoint or state_dict file (.pt/.pth/.bin/.safetensors);
            excludes `pretrained`.

    Returns:
        LoadedModel with the model in eval mode on the CPU in float32.

    Raises:
        ExportError: unknown model name or tag, both `pretrained` and `checkpoint` given, the
            checkpoint is missing or does not fit the model, the tag's weights cannot be
            downloaded (message names --checkpoint and the HF hub cache), or the tokenizer kind
            is unavailable here. Offline, a tag download first retries for about a minute unless
            HF_HUB_OFFLINE=1 is set.
    """
    register_demo_configs()
    _check_model_name(model_name)
    if checkpoint is not None and pretrained not in (None, RANDOM_LABEL):
        raise ExportError(f"pass either pretrained={pretrained!r} or checkpoint={checkpoint}, not both")

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ExportError(
                f"checkpoint {path} not found (expected an open_clip checkpoint or state_dict file)"
            )
        label = f"file:{path.name}"
        try:
            model = open_clip.create_model(model_name, pretrained=str(path))
        except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as exc:
            raise ExportError(f"checkpoint {path} does not load into {model_name}: {exc}") from exc
    elif pretrained in (None, RANDOM_LABEL):
        label = RANDOM_LABEL
        model = open_clip.create_model(model_name)
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ExportError(
                f"unknown pretrained tag {pretrained!r} for {model_name}; known tags: {tags or 'none'}. "
                "For local weights pass --checkpoint PATH instead"
            )
        # 'org/repo/' or 'org/repo/filename' (open_clip/pretrained.py download_pretrained)
        hub_repo = posixpath.split(open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub", ""))[0]
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained)
        except RuntimeError as exc:
            raise ExportError(
                f"could not get the weights of {model_name} pretrained={pretrained!r} (no network and not in "
                f"the HF hub cache?): {str(exc).rstrip('.')}. Either pass --checkpoint PATH to a local "
                "open_clip checkpoint or state_dict file, or put the weights into the HF hub cache "
                f"(HF_HUB_CACHE / HF_HOME) on a machine with network, e.g. `hf download {hub_repo or '<repo>'}`"
            ) from exc
        label = pretrained

    model = model.float().eval().to("cpu")
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except ImportError as exc:
        raise ExportError(
            f"the tokenizer of {model_name} needs a package that is not installed: {exc}"
        ) from exc
    context_length = int(tokenizer.context_length)
    model_ctx = getattr(model, "context_length", None)
    if model_ctx is not None and int(model_ctx) != context_length:
        raise ExportError(f"tokenizer context_length {context_length} != model context_length {model_ctx}")
    loaded = LoadedModel(
        model_name=model_name,
        model=model,
        tokenizer=tokenizer,
        preprocess=PreprocessConfig.from_model(model),
        pretrained=label,
        weights_sha256=state_dict_sha256(model),
        context_length=context_length,
    )
    log.info("loaded %s (%s), weights sha256 %s", model_name, label, loaded.weights_sha256[:16])
    return loaded
