"""The Vitrine retrieval service (`vitrine.v1.RetrievalService`), in layers; each imports only the ones below it.

    grpc/        transport: server wiring and lifecycle (server.py), thin handlers (handlers.py) converting
                 proto <-> plain values (convert.py), the one exception -> status table (status.py), bearer-token
                 auth, health (grpc.health.v1 driven by dependency probes), interceptors (metrics, request ids)
    usecases/    what the service does, on plain typed values, no proto: search, ingest, catalog (get, delete,
                 stats), generate (retrieval-augmented generation), rerank, pagination, image preprocessing,
                 the request/response types (types.py). A new transport calls these and nothing else.
    adapters/    one package per dependency: milvus/ (VectorStore, the schema table, filter grammar, error
                 mapping, AsyncVectorStore), triton/ (one channel with readiness, config cache and error
                 translation; EncoderClient; ModelReranker), gemini/ (GeminiGenerator over google-genai),
                 blob_store.py (original image bytes)
    errors.py    the exceptions every layer raises (no transport)
    tls.py       PEM files -> gRPC credentials and Milvus TLS arguments
    metrics.py   Prometheus metrics and /metrics; logs.py: structured logs, request ids
    settings.py  the aggregate typed Settings (each section defined by the layer that uses it), read once by the
                 wiring (grpc/server.py) and the CLI

Below all of it, the shared contract in `vitrine/` (manifest, stubs, tokenizer, image ids).
"""
