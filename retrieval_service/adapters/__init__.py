"""Clients of the services Vitrine depends on, one package per dependency: milvus/ (vectors), triton/ (encoder
towers and reranker model), gemini/ (image generation), blob_store.py (original image bytes on disk). They raise
retrieval_service.errors exceptions (DependencyUnavailableError when their dependency is down) and import
nothing from the use cases or the transport."""
