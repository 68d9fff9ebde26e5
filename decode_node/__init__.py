"""The DecodeNode gRPC service (braid.decode_node): Reserve hands out blocks for
a prompt's KV under a lease (with the instance's KV layout and endpoints);
Decode claims the reservation and streams tokens once the KV and the first
token have arrived (or prefills a short prompt locally); Abort frees
everything at any point. `python -m braid.decode_node --config cluster.yaml`
serves one.
"""
