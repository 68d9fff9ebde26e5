"""python -m braid.kernels.cpu_ext: build braid's CPU kernels; exits 0 with a note when it cannot."""
import sys

from braid.kernels import cpu_ext

try:
    cpu_ext.build()
    print(f"braid: CPU kernels built in {cpu_ext.build_dir()}")
except Exception as e:  # noqa: BLE001 - a machine without a compiler serves with the torch ops
    print(f"braid: CPU kernels not built ({type(e).__name__}: {str(e)[:300]}); the torch ops serve instead",
          file=sys.stderr)
