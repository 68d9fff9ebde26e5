"""The wire contracts (package `braid.v1`) at the bottom of the stack: the
.proto files, their generated stubs (`python -m braid.proto.generate`), and
small torch-free helpers every layer shares: the role and finish-reason names
(`names`) and the sampling rules (`sampling_rules`).

In a request's life: the client encodes GenerateRequest; the router checks its
SamplingParams and sends Reserve/Decode/Prefill to the nodes; a KVDestination
(with the decode instance's KVLayout) tells the prefill node where the KV goes;
tokens come back as DecodeResponse and GenerateResponse chunks.
"""
