"""The Router (braid.router), torch-free: the gRPC service clients call, over
one orchestrator. In a request's life: admission (a slot or RESOURCE_EXHAUSTED)
-> tokenize -> the retry book picks a (decode, prefill) pair by policy
(`policies`, `nodes`: the view of registered nodes and their load) -> one
attempt reserves on decode, opens the decode stream, prefills, streams tokens
back (`attempt`) -> on failure the book decides the retry or the status ->
metrics. `python -m braid.router --config cluster.yaml` serves one.
"""
