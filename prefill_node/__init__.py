"""The PrefillNode gRPC service (braid.prefill_node): receives a Prefill with
the prompt's token ids and a KVDestination (from the router, after the decode
node reserved blocks), converts it into the engine's own types, runs the PCP
prefill while the engine pushes each layer's KV to the decode node, and
answers once every block and the first token were acknowledged.
`python -m braid.prefill_node --config cluster.yaml` serves one.
"""
