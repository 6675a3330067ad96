"""Vitrine's demo: a tiny CLIP trained offline on scikit-learn's handwritten digits.

No model weights can be downloaded where Vitrine is developed, so the demo trains its own model:

- `vitrine-digits-tiny.json`: the open_clip model config. ViT image tower (3 layers, width 128,
  4 heads of width 32, 32 px input, 8 px patches -> 16 patches + class token) and text tower
  (3 layers, width 128, 4 heads, open_clip's default CLIP BPE tokenizer, vocabulary 49,408,
  context length 77 tokens as in CLIP), joint embedding of 128 dimensions.
  Image preprocessing is open_clip's default `PreprocessCfg` (RGB, resize shortest side bicubic,
  center crop to 32 px, OpenAI CLIP mean/std). The config file cannot carry a `preprocess_cfg`:
  for a registered (built-in style) model name open_clip passes every top-level key to
  `CLIP.__init__`, which rejects unknown ones. Gray digits rendered to RGB (three equal
  channels) are ordinary RGB input for that transform.
- `export.demo.data`: the deterministic train / held-out split of `sklearn.datasets.load_digits`,
  the digit rendering, and the PNG + metadata.jsonl writer.
- `export.demo.captions`: English and Chinese caption templates (training) and evaluation
  phrasings that match no training template.
- `export.demo.cache`: `ensure_checkpoint` (train once, cache by a content key, `cache_key`).
- `export.demo.train`: the training loop `train`, with `recipe` (`Recipe`, the hyperparameters),
  `losses` (soft CLIP + supervised contrastive), `augment` (random affine, caption sampling) and
  `model` (`create_demo_model`, trimmed/bucketed text encoding).
- `export.demo.evaluate`: `evaluate` (precision@10 on the held-out split).

This module imports neither torch nor open_clip; `register_model_config` imports open_clip lazily.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "vitrine-digits-tiny"
MODEL_CONFIG_PATH = Path(__file__).resolve().parent / f"{MODEL_NAME}.json"

__all__ = ["MODEL_CONFIG_PATH", "MODEL_NAME", "register_model_config"]


def register_model_config() -> str:
    """Register `vitrine-digits-tiny.json` with open_clip (once per process); returns the model name.

    After this, `open_clip.create_model(MODEL_NAME, ...)` and `open_clip.get_tokenizer(MODEL_NAME)`
    know the architecture.
    """
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_PATH)
    return MODEL_NAME
