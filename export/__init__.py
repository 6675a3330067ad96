"""Export open_clip CLIP towers to ONNX and a Triton model repository.

Modules:
    loading        `load_open_clip`: model (eval mode) + tokenizer + preprocess config + weights hash.
    towers         `ImageTower` / `TextTower`: the torch modules that become the two ONNX graphs.
    parity         the ONNX Runtime vs PyTorch gate on real images and texts.
    tokenizer_json the HF `tokenizers` file equal to the model's open_clip tokenizer.
    triton_config  `config.pbtxt` writer / reader (tritonclient `ModelConfig` messages).
    onnx_export    `export_repository`: everything above, written atomically into a repository.

The repository layout is the contract in `vitrine.manifest`. Importing this package imports neither
torch nor open_clip (`triton_config` and `ExportError` are usable on the serving side);
`export_repository` and `load_open_clip` are imported lazily on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "export_repository", "load_open_clip"]


class ExportError(RuntimeError):
    """An export cannot proceed or failed a check; the message says what to change."""


def __getattr__(name: str) -> Any:
    # Lazy so that `import export` (e.g. by the CLI) does not import torch.
    if name == "export_repository":
        from export.onnx_export import export_repository

        return export_repository
    if name == "load_open_clip":
        from export.loading import load_open_clip

        return load_open_clip
    raise AttributeError(f"module 'export' has no attribute {name!r}")
