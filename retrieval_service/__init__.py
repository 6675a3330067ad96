"""The Vitrine gRPC retrieval service (`vitrine.v1.RetrievalService`).

Modules: settings (typed configuration), preprocess (image decode + open_clip eval transform), tokenizer (text ->
token ids, no torch), encoder_client (Triton), vector_store (Milvus), blob_store (original bytes), ingest (the
batched ingest pipeline), pagination (page tokens), status (exceptions -> gRPC status), health (dependency
monitor), service (the RPC handlers), server (assembly, health, reflection, lifecycle).
"""
