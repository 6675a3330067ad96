"""Triton (PyTriton) encoder server for a Vitrine model repository; imports neither torch nor open_clip.

`EncoderServer` serves every `<repo>/<model>/config.pbtxt` + `<version>/model.onnx` with ONNX Runtime
behind Triton's KServe v2 gRPC/HTTP endpoints; `python -m encoder_server --repository DIR` runs it.
"""

from encoder_server.server import EncoderServer, ModelRepositoryError

__all__ = ["EncoderServer", "ModelRepositoryError"]
