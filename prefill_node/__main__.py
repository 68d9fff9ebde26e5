"""`python -m braid.prefill_node --config cluster.yaml [--set FIELD=VALUE ...]`: serve a prefill node
(the same as `braid prefill serve`). An entry point, so it may use the cluster config at the top of
the stack (the import-order test exempts __main__ modules)."""
import sys

from braid.cluster.cli import main

sys.exit(main(["prefill", "serve", *sys.argv[1:]]))
