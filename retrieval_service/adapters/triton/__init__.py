"""The Triton adapter: every call this service makes to Triton (KServe v2 gRPC, tritonclient asyncio).

    channel.py   TritonChannel: the one lazily opened channel (TLS, round_robin), the status codes that
                 mean "down" and the error translation, model readiness, the per-model cache of checked
                 configs; TritonError.
    encoder.py   EncoderClient: the image and text towers of the manifest -> float32 [B, D] embeddings;
                 EncoderError, EncoderMismatchError.
    reranker.py  ModelReranker: a reranker model's scores (the Triton reranker interface); RerankerError.

Every Triton outage surfaces as `DependencyUnavailableError('encoder')`.
"""
