"""The PrefillNode gRPC service: PCP prefill and the sending side of KV transfer."""
