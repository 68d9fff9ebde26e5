"""gRPC and protobuf definitions (package `braid.v1`) and their generated stubs."""
