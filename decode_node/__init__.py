"""The DecodeNode gRPC service: reservations with leases, DCP decode, the receiving side of KV transfer."""
