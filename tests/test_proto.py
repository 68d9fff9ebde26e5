"""The generated stubs are current, and our files live apart from etcd's in the descriptor pool."""
import filecmp
import os
import subprocess
import sys

from braid.proto import generate


def test_stubs_match_the_proto_files(tmp_path):
    written = generate.generate(str(tmp_path))
    assert written, "protoc produced nothing"
    stale = []
    for path in written:
        name = os.path.basename(path)
        checked_in = os.path.join(generate.HERE, name)
        if not os.path.exists(checked_in) or not filecmp.cmp(path, checked_in, shallow=False):
            stale.append(name)
    assert not stale, f"stale generated stubs {stale}: run `python -m braid.proto.generate`"


def test_descriptor_names_do_not_collide_with_etcd():
    code = (
        "import aetcd\n"
        "from braid.proto import common_pb2, nodes_pb2, router_pb2\n"
        "from google.protobuf import descriptor_pool\n"
        "pool = descriptor_pool.Default()\n"
        "names = [m.DESCRIPTOR.name for m in (common_pb2, nodes_pb2, router_pb2)]\n"
        "assert all(n.startswith('braid/proto/') for n in names), names\n"
        "assert pool.FindFileByName('kv.proto') and pool.FindFileByName('rpc.proto')\n"
        "assert pool.FindMessageTypeByName('braid.v1.NodeInfo')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
