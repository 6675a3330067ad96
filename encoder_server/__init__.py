"""Triton (PyTriton) encoder server for a Vitrine model repository; imports neither torch nor open_clip.

`EncoderServer` serves every `<repo>/<model>/config.pbtxt` + `<version>/model.onnx` with ONNX Runtime
behind Triton's KServe v2 gRPC/HTTP endpoints; `python -m encoder_server --repository DIR` runs it.

    repository.py  the repository read into ORT sessions: discover_models, load_model (latest version,
                   one session per instance, graph checked against config.pbtxt), numpy_dtype, warm-up
    runtime.py     ONNX Runtime sessions: execution providers (TensorRT > CUDA > CPU), config.pbtxt knobs
    server.py      EncoderServer: PyTriton binding, dynamic batcher, lifecycle
    __main__.py    `python -m encoder_server` (prints ENCODER_SERVER_READY when every model is ready)
"""

from encoder_server.repository import ModelRepositoryError
from encoder_server.server import EncoderServer

__all__ = ["EncoderServer", "ModelRepositoryError"]
