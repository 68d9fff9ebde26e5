"""Regenerate the Python stubs from the .proto files in this folder.

    python -m braid.proto.generate

The .proto files are compiled from a temporary tree `braid/proto/*.proto`, so
they register in the protobuf descriptor pool as `braid/proto/<name>.proto`
(never colliding with etcd's `kv.proto`, `rpc.proto`, `auth.proto`) and the
generated imports read `from braid.proto import ..._pb2`.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def generate(out_dir: str = HERE) -> list[str]:
    """Compile every .proto here into `out_dir`; returns the files written."""
    from grpc_tools import protoc

    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, "braid", "proto")
        os.makedirs(pkg)
        sources = sorted(glob.glob(os.path.join(HERE, "*.proto")))
        for src in sources:
            shutil.copy(src, pkg)
        rel = [os.path.join("braid", "proto", os.path.basename(s)) for s in sources]
        code = protoc.main(
            ["protoc", f"-I{tmp}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *rel]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        written = []
        for path in sorted(glob.glob(os.path.join(pkg, "*_pb2*.py*"))):
            dst = os.path.join(out_dir, os.path.basename(path))
            shutil.copy(path, dst)
            written.append(dst)
        return written


if __name__ == "__main__":
    for f in generate(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print(f)
