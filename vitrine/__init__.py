"""Vitrine's shared contract: what every part (export, encoder_server, retrieval_service, tools, clients) agrees on.
It imports nothing else of the project.

    manifest.py       the model repository's manifest.json (towers, sizes, tokenizer, model id)
    triton_config.py  config.pbtxt writer / reader (tritonclient ModelConfig messages)
    tokenizer.py      text -> token ids exactly as the exported text tower expects (HF tokenizers, no torch)
    image_ids.py      image ids: the sha256 of the encoded bytes
    client.py         VitrineClient, the Python client of the gRPC API
    v1/               the generated vitrine.v1 protobuf / gRPC stubs (`make proto`)

Packages above it: export/ (open_clip -> ONNX -> model repository), encoder_server/ (Triton over that repository),
retrieval_service/ (the gRPC service), tools/ (the `vitrine` CLI, benchmarks, demo).
"""

__version__ = "0.1.0"
