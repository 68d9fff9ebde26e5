"""What prefill and decode nodes share (braid.node).

A node's life:
  start   engine ranks up (braid.engine, on its own thread) -> gRPC server
          listening (health NOT_SERVING) -> registered in discovery under its
          lease -> health SERVING
  serve   each RPC of the role's service (braid.prefill_node, braid.decode_node)
          runs engine calls through the runtime; engine exceptions map to one
          status code each (braid.node.errors); load reports come from the
          engine's snapshot; a lost lease makes it refuse new work (UNAVAILABLE)
          until it has re-registered
  stop    health NOT_SERVING, lease revoked (routers drop the node at once),
          requests in flight drain for up to drain_timeout_s, server stops,
          engine ranks exit
"""
