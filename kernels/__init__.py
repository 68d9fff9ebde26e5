"""Attention ops returning `(out, lse)`, the exact LSE merge and the paged cache write.

`braid.kernels.reference` is the plain-torch ground truth; `braid.kernels.ops`
dispatches to the fastest tested implementation for a device.
"""
