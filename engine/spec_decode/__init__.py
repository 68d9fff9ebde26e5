"""Speculative decoding's engine-independent building blocks.

In a request's life: before a decode step, a proposer guesses up to k next
tokens for the sequence (`ngram`: prompt lookup, no draft model and no draft
KV); the target model then scores the k+1 positions (the last accepted token
and the k drafts) in one step; `acceptance` turns the target's k+1 rows and
the drafts into the 1..k+1 tokens the sequence actually emits (greedy
acceptance, or rejection sampling that keeps the target's distribution exactly).
The engine rolls back the KV of the drafts that were not accepted.

`ngram`, `acceptance` and `stats` know nothing of the scheduler, the cache layout
or the ranks: pure functions over token ids and probability tensors, tested on
their own. `draft` is rank 0's half of a draft model: it builds StepPlans for the
draft's passes and runs them through the executor (the ranks' half is the
worker's CMD_DRAFT).
"""
