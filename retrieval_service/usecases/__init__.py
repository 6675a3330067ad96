"""The use cases of the retrieval service, transport-neutral: plain typed values in and out (types.py), errors from
retrieval_service.errors. search.py (SearchImages), ingest.py (IngestImages), catalog.py (GetImage, DeleteImages,
GetCollectionStats), generate.py (GenerateImages), rerank.py (rerank methods behind one protocol), pagination.py
(page tokens), preprocess.py (image decode + open_clip eval transform). They call the adapters below them."""
