"""The import graph runs one way (DESIGN.md, Layout): proto, kernels and
tokenizer at the bottom; kv_transfer; engine; discovery; node; prefill_node
and decode_node; client; router; planner; cluster at the top. A folder imports
only folders to its left. Read from the source with ast, nothing executed;
`__main__` modules are entry points and may reach the top."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [("proto", "kernels", "tokenizer"), ("kv_transfer",), ("engine",), ("discovery",), ("node",),
          ("prefill_node", "decode_node"), ("client",), ("router",), ("planner",), ("cluster",)]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
TORCH_FREE = ("proto", "tokenizer", "client", "router")
"""Packages that must not import torch, even indirectly through another braid package."""
NEVER = {"router": {"kernels", "engine", "node"}, "client": {"kernels", "engine", "node", "kv_transfer", "discovery"},
         "engine": set()}
NO_WIRE = {"engine": ("grpc", "google.protobuf")}
"""The engine knows nothing of gRPC; protobuf reaches it only as the KV layout through kv_transfer."""
PLAIN_PROTO = {"braid.proto.sampling_rules", "braid.proto.prefix_hash"}
"""Plain-Python parts of the wire contract (no protobuf import) that the engine shares with the router."""


def _modules():
    for pkg in RANK:
        folder = ROOT / pkg
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            if path.name == "__main__.py" or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            yield pkg, path


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module == "braid":
                out += [(node.lineno, f"braid.{a.name}") for a in node.names]
    return out


def _violations() -> list[str]:
    bad = []
    for pkg, path in _modules():
        where = path.relative_to(ROOT)
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] == "braid" and len(parts) > 1 and parts[1] != pkg:
                other = parts[1]
                if other not in RANK:
                    bad.append(f"{where}:{line} imports {name}: unknown package")
                elif RANK[other] >= RANK[pkg] or other in NEVER.get(pkg, ()):
                    bad.append(f"{where}:{line} imports {name} ({pkg} may import only packages below it)")
            if pkg in TORCH_FREE and parts[0] == "torch":
                bad.append(f"{where}:{line} imports torch ({pkg} is torch-free)")
            if any(name == w or name.startswith(w + ".") for w in NO_WIRE.get(pkg, ())):
                bad.append(f"{where}:{line} imports {name} (the engine knows nothing of gRPC or protobuf)")
            if pkg == "engine" and name.startswith("braid.proto") and name not in PLAIN_PROTO:
                bad.append(f"{where}:{line} imports {name} (protobuf reaches the engine only through kv_transfer)")
    return bad


def test_every_import_runs_down_the_stack():
    assert _violations() == []


def test_plain_proto_modules_import_no_protobuf():
    """The exemption for the engine holds only while those modules stay plain Python."""
    for module in PLAIN_PROTO:
        path = ROOT / (module.removeprefix("braid.").replace(".", "/") + ".py")
        names = [name for _, name in _imports(path)]
        assert not [n for n in names if n.startswith(("google", "grpc", "braid"))], (module, names)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The walk is not vacuous: an upward import planted in a copy of the tree is reported."""
    fake = tmp_path / "root"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "x.py").write_text("from braid.router.config import RouterConfig\nimport grpc\n")
    (fake / "router").mkdir()
    (fake / "router" / "y.py").write_text("import torch\nfrom braid.engine import LLM\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = "\n".join(_violations())
    assert "engine/x.py:1 imports braid.router.config" in found
    assert "engine/x.py:2 imports grpc" in found
    assert "router/y.py:1 imports torch" in found and "router/y.py:2 imports braid.engine" in found


@pytest.mark.parametrize("module", ["braid.router", "braid.client", "braid.tokenizer", "braid.cluster.config"])
def test_torch_free_in_a_fresh_interpreter(module):
    """The router process loads the router, the client, the tokenizer and the cluster config: no torch."""
    probe = ("import importlib, pkgutil, sys\n"
             f"m = importlib.import_module({module!r})\n"
             "for info in pkgutil.iter_modules(getattr(m, '__path__', []), m.__name__ + '.'):\n"
             "    if not info.name.endswith('__main__'):\n"
             "        importlib.import_module(info.name)\n"
             "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))[:3])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} imports torch: {out.stdout}"
