"""Moving KV between instances, below the engine: the KV layout descriptor
(`layout`: what each rank of an instance stores), the transfer planner
(`planner`: any prefill layout to any decode layout, block by block), the
transports (`tcp`, `collective` over gloo/NCCL/HCCL, `mooncake` for RDMA) and
their books (`receiver_book`, `sender_book`).

In a request's life: the decode instance reserves blocks and every rank
expects its byte ranges; after each prefill layer every prefill rank sends
the blocks it owns straight into the decode ranks' caches; the last frame
carries the first token; the receivers report completion, and a failed or
cancelled transfer never writes into memory after its cancel returned.
"""
