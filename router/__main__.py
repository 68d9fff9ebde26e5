"""`python -m braid.router --config cluster.yaml [--set FIELD=VALUE ...]`: serve the router
(the same as `braid router serve`). An entry point, so it may use the cluster config at the top of
the stack (the import-order test exempts __main__ modules)."""
import sys

from braid.cluster.cli import main

sys.exit(main(["router", "serve", *sys.argv[1:]]))
