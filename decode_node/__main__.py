"""`python -m braid.decode_node --config cluster.yaml [--set FIELD=VALUE ...]`: serve a decode node
(the same as `braid decode serve`). An entry point, so it may use the cluster config at the top of
the stack (the import-order test exempts __main__ modules)."""
import sys

from braid.cluster.cli import main

sys.exit(main(["decode", "serve", *sys.argv[1:]]))
