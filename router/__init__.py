"""The Router gRPC service, routing policies, the request orchestrator and the `braid` CLI."""
