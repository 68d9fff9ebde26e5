"""The top of the stack (braid.cluster): the one cluster config tree (config),
the local launcher used by `braid up`, the tests and the benchmarks
(launcher, up, parallel_fit), and the `braid` command line (cli).

A cluster's life from here: load and validate the YAML (every field named on
error) -> fit parallel layouts to the model -> start etcd, the nodes and the
router as processes -> route requests -> stop in reverse order.
"""
