"""Hardware specs: peaks from datasheets, efficiency factors from calibration.

A spec is the speed of light of one device (a "card": one die on Ascend 910C,
where an A3 node holds 16 of them) and its links, plus `Factors`: how far
below the peaks a given software stack runs. The peaks rank deployments; the
factors make the seconds right, and come from a calibration run
(`braid plan calibrate`, this machine) or a fit to published measurements
(`braid.planner.fit`, hardware braid cannot reach). The built-in 910C factors
are the fit on the vllm-ascend guide's DeepSeek-R1 baseline row (tests check
that they still are).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class Factors:
    """Efficiency of the software stack on the device, fitted, not derived."""

    gemm_util: float = 0.5
    """Fraction of the dtype's peak FLOP/s that GEMMs reach."""
    attn_util: float = 0.3
    """Fraction of the BF16 peak that prefill attention reaches."""
    mem_util: float = 0.7
    """Fraction of HBM bandwidth that weight and KV streaming reaches."""
    kv_util: float = 0.7
    """Fraction of memory bandwidth that decode attention's paged KV reads reach."""
    decode_attn_util: float = 0.0
    """Fraction of the peak that decode attention's arithmetic reaches (a CPU's paged
    decode kernel is bound by it, not by the KV read); 0: attn_util."""
    comm_util: float = 0.6
    """Fraction of link bandwidth that collectives reach."""
    token_s: float = 0.0
    """Device-seconds per token per layer beyond the GEMM roofline (quantization,
    vector ops, MoE dispatch bookkeeping, launches), spread over the devices
    that run the token's MLP. Calibrated: it does not follow from FLOPs."""
    layer_overhead_s: float = 20e-6
    """Fixed cost per layer per forward step (kernel launches, synchronisation)."""
    step_overhead_s: float = 2e-3
    """Fixed cost per forward step (scheduling, sampling, host work)."""
    request_overhead_s: float = 0.0
    """A served request's hops beyond the instances' compute (router, the decode
    reservation, RPCs, the first token's way back), added to its TTFT."""


@dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str
    peak_flops: dict = field(default_factory=dict)
    """FLOP/s per dtype: "bf16", "int8" (int8 / fp8 GEMMs), "fp32"."""
    mem_bytes: int
    mem_bw: float
    """HBM bytes/s."""
    scaleup_bw: float
    """Bytes/s per direction per device inside a node (HCCS/UB, NVLink)."""
    scaleout_bw: float
    """Bytes/s per direction per device between nodes (RoCE / InfiniBand)."""
    devices_per_node: int
    link_latency_s: float = 10e-6
    reserve_bytes: int = 8 * GiB
    """Device memory kept for activations, collective buffers and workspaces."""
    device: str = "cpu"
    """braid's parallel.device for this hardware (cpu, cuda, npu)."""
    resource: str | None = None
    """The Kubernetes extended resource of one device, as its device plugin names it."""
    factors: Factors = field(default_factory=Factors)

    def peak(self, dtype_bytes: int) -> float:
        key = {1: "int8", 2: "bf16", 4: "fp32"}[dtype_bytes]
        return self.peak_flops.get(key) or self.peak_flops["bf16"]

    def link_bw(self, group: int) -> float:
        """Per-device bandwidth of a collective over `group` devices (intra-node if it fits)."""
        return self.scaleup_bw if group <= self.devices_per_node else self.scaleout_bw

    def with_factors(self, **changes) -> "Hardware":
        return dataclasses.replace(self, factors=dataclasses.replace(self.factors, **changes))


BUILTIN = {
    # One 910C die (an A3 "card", 64 GB); CloudMatrix384 figures halved per die.
    # Factors: the fit on the seed's DeepSeek-R1 W8A8 baseline row (see module doc).
    "910c": Hardware(name="910c", peak_flops={"bf16": 376e12, "int8": 752e12, "fp32": 94e12}, mem_bytes=64 * GiB,
                     mem_bw=1.6e12, scaleup_bw=196e9, scaleout_bw=25e9, devices_per_node=16, device="npu",
                     resource="huawei.com/Ascend910",
                     factors=Factors(attn_util=0.3048, token_s=3.793e-5, gemm_util=0.5,
                                     layer_overhead_s=50e-6, step_overhead_s=5e-3)),
    # Ascend 910B (A2): BF16 peak is SKU-dependent (256-320 TF quoted); HCCS 8-way mesh.
    "910b": Hardware(name="910b", peak_flops={"bf16": 280e12, "int8": 560e12, "fp32": 70e12}, mem_bytes=64 * GiB,
                     mem_bw=1.6e12, scaleup_bw=56e9 * 7 / 2, scaleout_bw=25e9, devices_per_node=8, device="npu",
                     resource="huawei.com/Ascend910",
                     factors=Factors(attn_util=0.27, token_s=4.2e-5, layer_overhead_s=50e-6, step_overhead_s=5e-3)),
    "h100": Hardware(name="h100", peak_flops={"bf16": 989e12, "int8": 1979e12, "fp32": 67e12}, mem_bytes=80 * 10**9,
                     mem_bw=3.35e12, scaleup_bw=450e9, scaleout_bw=50e9, devices_per_node=8, device="cuda",
                     resource="nvidia.com/gpu", factors=Factors(attn_util=0.5, gemm_util=0.6, token_s=2e-6)),
    "h200": Hardware(name="h200", peak_flops={"bf16": 989e12, "int8": 1979e12, "fp32": 67e12}, mem_bytes=141 * 10**9,
                     mem_bw=4.8e12, scaleup_bw=450e9, scaleout_bw=50e9, devices_per_node=8, device="cuda",
                     resource="nvidia.com/gpu", factors=Factors(attn_util=0.5, gemm_util=0.6, token_s=2e-6)),
}

LOCAL_PATH = os.path.join(os.path.expanduser("~"), ".cache", "braid", "hardware-local.yaml")


def hardware_from_dict(data: dict, where: str = "hardware") -> Hardware:
    """A spec from YAML fields; `base: <name>` starts from a built-in and overrides it."""
    data = dict(data)
    base = data.pop("base", None)
    factors = data.pop("factors", None) or {}
    known = {f.name for f in dataclasses.fields(Hardware)} - {"factors"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    bad = sorted(set(factors) - {f.name for f in dataclasses.fields(Factors)})
    if bad:
        raise ValueError(f"{where}: unknown factors {bad}")
    if base is not None:
        hw = dataclasses.replace(load_hardware(base), **data)
    else:
        try:
            hw = Hardware(**data)
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None
    return hw.with_factors(**{k: float(v) for k, v in factors.items()})


def load_hardware(name: str) -> Hardware:
    """A built-in name, "local" (the calibration's output), or a YAML file."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name == "local":
        if not os.path.isfile(LOCAL_PATH):
            raise ValueError(f"--hardware local: {LOCAL_PATH} missing; run `braid plan calibrate` first")
        name = LOCAL_PATH
    if name.endswith((".yaml", ".yml")) and os.path.isfile(name):
        with open(name) as f:
            return hardware_from_dict(yaml.safe_load(f) or {}, name)
    raise ValueError(f"--hardware {name!r}: unknown; built-in: {', '.join(sorted(BUILTIN))}, local, or a YAML file")


def hardware_to_dict(hw: Hardware) -> dict:
    data = dataclasses.asdict(hw)
    data["factors"] = dataclasses.asdict(hw.factors)
    return data
