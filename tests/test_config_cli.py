"""The cluster config loader and the `braid` command line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from braid.cluster.config import (
    DEFAULT_DECODE_PORT,
    ClusterConfig,
    ConfigError,
    load_config,
    to_dict,
)

BRAID = [sys.executable, "-m", "braid.cluster.cli"]


def test_defaults_and_nested_overrides_keep_their_siblings():
    cfg = load_config(data={"decode": {"cache": {"block_size": 32}}, "prefill": {"cache": {"block_size": 32}}})
    assert cfg.decode.cache.block_size == 32
    assert (cfg.decode.parallel.tensor_parallel_size, cfg.decode.parallel.decode_context_parallel_size) == (2, 2)
    assert cfg.prefill.parallel.prefill_context_parallel_size == 2
    assert cfg.decode.port == DEFAULT_DECODE_PORT
    cfg = load_config(overrides=["router.port=1234", "etcd.endpoints=[a:1, b:2]", "decode.scheduler.max_model_len=null"])
    assert cfg.router.port == 1234 and cfg.etcd.endpoints == ("a:1", "b:2") and cfg.decode.scheduler.max_model_len is None
    assert load_config(data=to_dict(cfg)) == cfg  # a dumped config loads back the same


@pytest.mark.parametrize(
    "data,field,reason",
    [
        ({"router": {"prot": 1}}, "router.prot", "unknown field"),
        ({"decode": {"cache": {"block_size": "x"}}}, "decode.cache.block_size", "expected an integer"),
        ({"router": {"prefill_policy": "random"}}, "router.prefill_policy", "unknown policy"),
        ({"decode": {"cache": {"block_size": 8}}}, "decode.cache.block_size", "prefill.cache.block_size"),
        ({"decode": {"transfer": {"transport": "udp"}}}, "decode.transfer.transport", "unknown transport"),
        ({"router": {"port": 70000}}, "router.port", "outside"),
        ({"etcd": {"endpoints": ["nohost"]}}, "etcd.endpoints[0]", "host:port"),
        ({"prefill": {"cache": {"cp_kv_cache_interleave_size": 1}}}, "prefill.cache.cp_kv_cache_interleave_size", "block_size"),
        ({"model": "/does/not/exist"}, "model", "not a directory"),
        ({"cluster": "a/b"}, "cluster", "without '/'"),
        ({"decode": []}, "decode", "mapping"),
        ({"decode": {"parallel": {"expert_parallel_size": 3}}}, "decode.parallel.expert_parallel_size", "must divide"),
        ({"prefill": {"parallel": {"enable_expert_parallel": "yes"}}}, "prefill.parallel.enable_expert_parallel",
         "expected true or false"),
    ],
)
def test_bad_config_names_the_field_and_the_reason(data, field, reason):
    with pytest.raises(ConfigError) as e:
        load_config(data=data)
    assert str(e.value).startswith(field) and reason in str(e.value)


def test_expert_parallel_settings_load_from_the_file_and_overrides():
    # EP 4 over prefill tp 2 x pcp 2 (one EP group across both PCP ranks); decode EP = tp when only enabled
    cfg = load_config(data={"prefill": {"parallel": {"tensor_parallel_size": 2, "expert_parallel_size": 4}}},
                      overrides=["decode.parallel.enable_expert_parallel=true"])
    assert cfg.prefill.parallel.topology.ep == 4 and cfg.prefill.parallel.topology.all_ep_groups() == [[0, 1, 2, 3]]
    assert cfg.decode.parallel.enable_expert_parallel is True and cfg.decode.parallel.topology.ep == 2
    assert load_config().decode.parallel.topology.ep == 1  # off by default
    assert load_config(data=to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "flags,ep",
    [([], 1), (["--tp", "2", "--enable-expert-parallel"], 2), (["--tp", "2", "--pcp", "2", "--ep", "4"], 4),
     (["--tp", "4", "--ep", "2"], 2)],
)
def test_offline_expert_parallel_flags_reach_the_engine_config(flags, ep):
    from braid.cluster.cli import _offline_settings, build_parser
    from braid.engine.config import EngineConfig

    args = build_parser().parse_args(["offline", "hi", *flags])
    assert EngineConfig.build("model", **_offline_settings(args)).topology.ep == ep


def test_offline_expert_parallel_on_a_dense_model_fails_with_the_reason(tmp_path):
    env = dict(os.environ, BRAID_HOME=str(tmp_path / "home"))
    out = subprocess.run(BRAID + ["offline", "--model", "tiny", "--tp", "2", "--enable-expert-parallel", "hi"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0 and "has no routed experts" in out.stderr


def test_bad_override_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        load_config(overrides=["router.port"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("router: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "args",
    [[], ["up"], ["router"], ["router", "serve"], ["prefill", "serve"], ["decode", "serve"], ["generate"], ["status"], ["offline"]],
)
def test_every_command_has_help(args):
    out = subprocess.run(BRAID + args + ["--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: braid" in out.stdout


def test_serve_with_a_bad_config_fails_at_start(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"decode": {"parallel": {"tensor_parallel_size": 0}}}))
    out = subprocess.run(BRAID + ["decode", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "decode.parallel.tensor_parallel_size: must be > 0" in out.stderr


@pytest.mark.timeout(300)
def test_up_demo_serves_one_request_and_shuts_down(tmp_path):
    env = dict(os.environ, BRAID_HOME=str(tmp_path / "home"))  # the embedded tiny model is created here
    out = subprocess.run(BRAID + ["up", "--model", "tiny", "--demo", "Hello world", "--max-tokens", "6"],
                         capture_output=True, text=True,
                         timeout=280, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("braid: cluster up; router at 127.0.0.1:") for line in lines)
    assert any("OpenAI HTTP API at http://127.0.0.1:" in line and line.endswith("/v1") for line in lines)
    tokens = next(line for line in lines if line.startswith("tokens: "))
    assert len(yaml.safe_load(tokens[len("tokens: "):])) == 6
    assert any("prefill on prefill-" in line and "decode on decode-" in line for line in lines)
    assert lines[-1] == "braid: shutting down"
    # the same answer from the offline engine on the same embedded model
    off = subprocess.run(BRAID + ["offline", "--model", "tiny", "Hello world", "--max-tokens", "6"],
                         capture_output=True, text=True,
                         timeout=120, env=env)
    assert off.returncode == 0 and tokens in off.stdout


def test_offline_speculation_flag_and_cluster_section_reach_the_engine(tmp_path):
    from braid.cluster.cli import _offline_settings, build_parser
    from braid.cluster.config import load_config
    from braid.engine.config import EngineConfig

    args = build_parser().parse_args(["offline", "hi", "--spec-k", "3"])
    assert EngineConfig.build("model", **_offline_settings(args)).speculative.num_speculative_tokens == 3
    args = build_parser().parse_args(["offline", "hi", "--spec-k", "2", "--spec-method", "mtp"])
    assert EngineConfig.build("model", **_offline_settings(args)).speculative.method == "mtp"
    args = build_parser().parse_args(["offline", "hi", "--spec-method", "draft", "--draft-model", "/d"])
    spec = EngineConfig.build("model", **_offline_settings(args)).speculative
    assert (spec.method, spec.draft_model) == ("draft", "/d")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["offline", "hi", "--spec-method", "eagle"])
    cfg = load_config(data={"decode": {"speculative": {"num_speculative_tokens": 4, "ngram_max": 5}}})
    spec = cfg.node("decode").engine_config("decode", "model").speculative
    assert (spec.num_speculative_tokens, spec.ngram_max) == (4, 5)
    with pytest.raises(ValueError, match="num_speculative_tokens: at most 16"):
        load_config(data={"decode": {"speculative": {"num_speculative_tokens": 17}}})
