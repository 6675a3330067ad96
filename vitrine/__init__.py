"""Vitrine: multimodal retrieval and retrieval-augmented image generation as a service.

Packages:
    export/            open_clip towers -> ONNX -> Triton model repository (needs torch)
    encoder_server/    Triton (PyTriton) serving that repository over KServe v2
    retrieval_service/ gRPC API (vitrine.v1) over the encoder and Milvus
    vitrine/           the shared repository contract (manifest), the generated API stubs, the CLI
"""

__version__ = "0.1.0"
