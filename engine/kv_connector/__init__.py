"""The KV connector: how a prompt's KV cache moves from a prefill instance into
a decode instance's reserved blocks, split in two halves as the step loop is.

- The scheduler half (`scheduler.KVConnectorScheduler`) lives with the
  scheduler on rank 0: reservations and their leases (one timer each), which
  requests wait for KV, which finished sending, and what every rank must do
  at the next step (expect, send, finish, release, report progress).
- The worker half (`worker.KVConnectorWorker`) lives in every rank: the
  transport endpoints, the per-layer sends during a prefill step, the landing
  of frames into the cache, and this rank's view of each transfer's state.

The halves talk only through the step: rank 0 puts a `KVConnectorMeta`
(`metadata`) into the StepPlan every rank runs, and each rank reports its
transfers' states in the step's result, agreed across ranks with one MAX
all-reduce. Engine-side types of the reservation and of a send target are in
`types`; transport construction in `transports`.
"""
