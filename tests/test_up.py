"""`braid up` as a new user meets it: layouts fitted to the model it is given
(or refused before any process starts, with the layouts that would work), and
a component that fails to start leaves its log and quotes it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from braid.cluster.config import ConfigError, load_config
from braid.cluster.parallel_fit import fit_parallel, valid_parallel
from braid.engine.model_config import load_model_config
from braid.engine.topology import Topology, validate_for_model
from braid.tokenizer import Tokenizer

BRAID = [sys.executable, "-m", "braid.cluster.cli"]


def _brute_force_decode(model, max_ranks):
    out = set()
    for tp in range(1, max_ranks + 1):
        for dcp in range(1, tp + 1):
            try:
                validate_for_model(Topology(tp=tp, dcp=dcp), model)
            except ValueError:
                continue
            out.add((tp, 1, dcp))
    return out


@pytest.mark.parametrize("name", ["smol-shape", "kv1", "kv2", "llama-gqa4", "qwen3-gqa4"])
@pytest.mark.parametrize("max_ranks", [2, 4, 8])
def test_valid_parallel_are_exactly_the_ones_the_engine_accepts(checkpoints, name, max_ranks):
    model = load_model_config(checkpoints.get(name))
    got = {(p.tensor_parallel_size, p.prefill_context_parallel_size, p.decode_context_parallel_size)
           for p in valid_parallel(model, "decode", max_ranks)}
    assert got == _brute_force_decode(model, max_ranks)
    for p in valid_parallel(model, "prefill", max_ranks):
        validate_for_model(p.topology, model)  # raises if the engine would refuse it
        assert p.topology.world <= max_ranks and p.decode_context_parallel_size == 1


def test_fit_keeps_what_fits_replaces_defaults_and_refuses_explicit(checkpoints):
    smol = load_model_config(checkpoints.get("smol-shape"))
    cfg, notes = fit_parallel(load_config(), smol, explicit=set(), cores=2)
    assert cfg.prefill.parallel.topology == Topology(pcp=2)  # pcp 2 needs nothing of the heads: kept
    assert cfg.decode.parallel.topology == Topology(tp=1, dcp=1)  # tp 2 cannot split 9 heads
    assert len(notes) == 1 and notes[0].startswith("decode: tp 2 pcp 1 dcp 2 does not fit")
    kv1 = load_model_config(checkpoints.get("kv1"))
    assert fit_parallel(load_config(), kv1, explicit=set(), cores=2) == (load_config(), [])
    with pytest.raises(ConfigError, match=r"decode\.parallel: tensor_parallel_size 2 must divide num_attention_heads 9"
                                          r".*tp 1 pcp 1 dcp 1"):
        fit_parallel(load_config(), smol, explicit={"decode"}, cores=2)


def test_up_fits_the_layout_and_serves_exactly(checkpoints, tmp_path):
    model = checkpoints.get("smol-shape")
    out = subprocess.run(BRAID + ["up", "--model", model, "--demo", "Hello world", "--max-tokens", "5"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "braid: decode: tp 2 pcp 1 dcp 2 does not fit this model" in out.stdout
    tokens = yaml.safe_load(next(x for x in out.stdout.splitlines() if x.startswith("tokens: "))[len("tokens: "):])
    prompt = Tokenizer(model).encode("Hello world")
    assert tokens == checkpoints.greedy("smol-shape", prompt, 5)


def test_up_refuses_an_explicit_layout_before_starting_anything(checkpoints):
    model = checkpoints.get("smol-shape")
    out = subprocess.run(BRAID + ["up", "--model", model, "--set", "decode.parallel.tensor_parallel_size=2",
                                  "--demo", "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "tensor_parallel_size 2 must divide num_attention_heads 9" in out.stderr
    assert "tp 1 pcp 1 dcp 1" in out.stderr
    assert "cluster up" not in out.stdout and "braid-up-" not in out.stderr  # no work folder, no process


def test_a_component_that_fails_to_start_keeps_its_log(checkpoints, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(checkpoints.get("kv1"), broken)
    os.remove(os.path.join(broken, "model.safetensors"))  # config and tokenizer load; the weights do not
    out = subprocess.run(BRAID + ["up", "--model", broken, "--demo", "x"], capture_output=True, text=True, timeout=280)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    m = re.search(r"exited with code \d+; its log \((\S+\.log)\) ends:", out.stderr)
    assert m, out.stderr
    kept = re.search(r"logs kept in (\S+)", out.stderr).group(1)
    try:
        log = m.group(1)
        assert os.path.isfile(log) and log.startswith(kept)
        last = [x for x in open(log).read().splitlines() if x.strip()][-1]
        assert last in out.stderr  # the error quotes the log's last lines
    finally:
        shutil.rmtree(kept, ignore_errors=True)
