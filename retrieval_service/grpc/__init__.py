"""gRPC transport of the retrieval service: `create_server` / `serve` (server.py), the `vitrine.v1` handlers
(handlers.py, proto <-> plain values in convert.py), the exception -> status table (status.py), bearer-token auth
(auth.py), grpc.health.v1 (health.py) and server interceptors (interceptors.py). Imports the use cases; nothing
below imports this package."""
