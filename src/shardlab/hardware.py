"""Hardware presets (links and GPUs) and ``nvidia-smi topo -m`` parsing.

Bandwidths are **per direction** in bytes/s (GB = 1e9 bytes), the figure that bounds how fast
one rank can push its share of a collective; the marketing "bidirectional" number is twice
that and is available as :attr:`LinkSpec.bidirectional`.

Latency ``alpha`` is the per-step cost the alpha-beta model in :mod:`shardlab.cost` charges
for every step of a collective (a ring all-reduce over p ranks takes 2(p-1) steps). The
presets are of the order NCCL's own tuning model uses for one hop (``src/graph/tuning.cc``,
``hwLat``: ring, per protocol LL..Simple, about 0.5-3.4 us over NVLink, 1-5.7 us over PCIe,
2.7-14 us over the network). They leave out kernel launch and framework overhead: the
end-to-end 16 KiB all-reduce measured on 2 x H100 took 65 us (SYLLABUS.md), which is what
:func:`shardlab.cost.fit_alpha_beta` calibrates from measurements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations

from ._presets import lookup

__all__ = [
    "GB",
    "gbit_per_s",
    "LinkSpec",
    "LINKS",
    "get_link",
    "nvlink_bandwidth",
    "GPUSpec",
    "GPUS",
    "get_gpu",
    "Topology",
    "parse_topology",
    "load_topology",
    "TPVerdict",
    "tp_verdict",
    "CONNECTION_LEVELS",
]

GB = 1e9  # bytes; link and memory datasheets use decimal units


def gbit_per_s(gbits: float) -> float:
    """Convert a signalling rate in Gb/s (network datasheets) to bytes/s: divide by 8."""
    return gbits * 1e9 / 8


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkSpec:
    """One interconnect: per-direction bandwidth (bytes/s) and per-step latency (s)."""

    name: str
    bandwidth: float  # bytes/s, each direction
    alpha: float  # seconds per message / collective step
    kind: str = ""  # "nvlink", "pcie" or "network"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")
        if not self.alpha >= 0:
            raise ValueError(f"link {self.name!r}: alpha must be >= 0 seconds, got {self.alpha!r}")

    @property
    def bidirectional(self) -> float:
        """Both directions added up: the figure datasheets headline (e.g. 600 GB/s for A100)."""
        return 2 * self.bandwidth


# NVLink 3 and 4 both carry 25 GB/s per direction per link (50 GB/s bidirectional per link);
# A100 bonds 12 links, H100/H200 SXM bond 18 (NVIDIA A100 / H100 datasheets).
NVLINK_LINK_BANDWIDTH = 25 * GB

_ALPHA_NVLINK = 2e-6  # NCCL hwLat, NVLink ring: 0.5 (LL) to 3.4 us (Simple) per hop
_ALPHA_PCIE = 3e-6  # NCCL hwLat, PCI ring: 1.0 (LL) to 5.7 us (Simple) per hop
_ALPHA_IB = 5e-6  # NCCL hwLat, NET ring: 2.7 (LL) to 14 us (Simple) per hop

LINKS: dict[str, LinkSpec] = {
    "nvlink-a100": LinkSpec("nvlink-a100", 12 * NVLINK_LINK_BANDWIDTH, _ALPHA_NVLINK, "nvlink",
                            "A100 SXM, NVLink 3, 12 links: 300 GB/s each way (600 GB/s both)"),
    "nvlink-h100": LinkSpec("nvlink-h100", 18 * NVLINK_LINK_BANDWIDTH, _ALPHA_NVLINK, "nvlink",
                            "H100 SXM, NVLink 4, 18 links: 450 GB/s each way (900 GB/s both)"),
    "nvlink-h200": LinkSpec("nvlink-h200", 18 * NVLINK_LINK_BANDWIDTH, _ALPHA_NVLINK, "nvlink",
                            "H200 SXM, NVLink 4, 18 links: as H100"),
    # PCIe x16: 16 lanes x 16 GT/s (Gen4) or 32 GT/s (Gen5) / 8 bits, one direction; the
    # 128b/130b encoding leaves about 1.5% less (31.5 GB/s for Gen4), protocol overhead more.
    "pcie4": LinkSpec("pcie4", 16 * 16e9 / 8, _ALPHA_PCIE, "pcie",
                      "PCIe 4.0 x16: about 32 GB/s each way (64 GB/s both)"),
    "pcie5": LinkSpec("pcie5", 16 * 32e9 / 8, _ALPHA_PCIE, "pcie",
                      "PCIe 5.0 x16: about 64 GB/s each way (128 GB/s both)"),
    "ib-hdr": LinkSpec("ib-hdr", gbit_per_s(200), _ALPHA_IB, "network",
                       "InfiniBand HDR, one port: 200 Gb/s = 25 GB/s each way"),
    "ib-ndr": LinkSpec("ib-ndr", gbit_per_s(400), _ALPHA_IB, "network",
                       "InfiniBand NDR, one port: 400 Gb/s = 50 GB/s each way"),
}


def get_link(link: str | LinkSpec) -> LinkSpec:
    """Return ``link`` if it is a :class:`LinkSpec`, else the :data:`LINKS` preset of that key."""
    return lookup(link, LINKS, LinkSpec, "link")


def nvlink_bandwidth(label: str, per_link: float = NVLINK_LINK_BANDWIDTH) -> float:
    """Per-direction bandwidth of an ``NV#`` topology entry: # bonded links x ``per_link``.

    The default 25 GB/s per link holds for data-center NVLink 2/3/4 (V100, A100, H100, H200);
    workstation bridges (e.g. RTX A6000, NV4) run slower links: pass their ``per_link``.
    """
    match = re.fullmatch(r"NV(\d+)", label.strip())
    if not match:
        raise ValueError(f"{label!r} is not an NVLink entry; expected NV followed by a link count, e.g. NV18")
    return int(match.group(1)) * per_link


# --------------------------------------------------------------------------------------------
# GPUs (datasheet values; dense = without 2:4 sparsity)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: memory capacity and bandwidth, dense bf16 peak, its GPU-GPU link."""

    name: str
    memory_bytes: float
    hbm_bandwidth: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    link: str  # key of LINKS for GPU-to-GPU traffic inside a node

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB


# Memory as marketed (decimal GB): the conservative figure for fits-in-memory checks.
GPUS: dict[str, GPUSpec] = {
    # NVIDIA A100 80GB SXM datasheet: 2,039 GB/s HBM2e, 312 TFLOP/s dense BF16.
    "a100-80gb": GPUSpec("A100-SXM-80GB", 80 * GB, 2039 * GB, 312e12, "nvlink-a100"),
    # NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (1,979 with sparsity).
    "h100-80gb": GPUSpec("H100-SXM-80GB", 80 * GB, 3350 * GB, 989e12, "nvlink-h100"),
    # NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, same compute as H100 SXM.
    "h200-141gb": GPUSpec("H200-SXM-141GB", 141 * GB, 4800 * GB, 989e12, "nvlink-h200"),
    # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, 362 TFLOP/s dense BF16, PCIe 4.0 only.
    "l40s-48gb": GPUSpec("L40S-48GB", 48 * GB, 864 * GB, 362e12, "pcie4"),
}


def get_gpu(gpu: str | GPUSpec) -> GPUSpec:
    """Return ``gpu`` if it is a :class:`GPUSpec`, else the :data:`GPUS` preset of that key."""
    return lookup(gpu, GPUS, GPUSpec, "GPU")


# --------------------------------------------------------------------------------------------
# nvidia-smi topo -m
# --------------------------------------------------------------------------------------------
# Connection labels from the nvidia-smi legend, best first. NV# is handled separately (more
# bonded links = better). SOC is the pre-2017 spelling of SYS.
CONNECTION_LEVELS: dict[str, str] = {
    "PIX": "at most one PCIe bridge",
    "PXB": "several PCIe bridges, no host bridge",
    "PHB": "through a PCIe host bridge (the CPU)",
    "NODE": "between PCIe host bridges within one NUMA node",
    "SYS": "across the CPU interconnect between NUMA nodes (QPI/UPI/Infinity Fabric)",
    "SOC": "across CPU sockets (old nvidia-smi name for SYS)",
}
_PCIE_RANK = {label: i for i, label in enumerate(CONNECTION_LEVELS)}
_DEVICE_LABEL = re.compile(r"(GPU\d+|NIC\d+|mlx\w+)$")


def _strength(label: str) -> tuple[int, int]:
    """Sort key, larger is better: (1, links) for NV#, (0, -PCIe level) otherwise."""
    if label.startswith("NV"):
        return (1, int(label[2:]))
    return (0, -_PCIE_RANK[label])


@dataclass(frozen=True)
class Topology:
    """GPU-to-GPU connection matrix from ``nvidia-smi topo -m`` (NICs and CPU columns dropped)."""

    gpus: tuple[str, ...]
    matrix: tuple[tuple[str, ...], ...]  # matrix[i][j]: label such as "NV18", "PIX", "SYS"; "X" on the diagonal
    nics: tuple[str, ...] = ()

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    def _index(self, gpu: int | str) -> int:
        if isinstance(gpu, str):
            if gpu not in self.gpus:
                raise ValueError(f"unknown GPU {gpu!r}; this topology has {', '.join(self.gpus)}")
            return self.gpus.index(gpu)
        if not 0 <= gpu < len(self.gpus):
            raise ValueError(f"GPU index {gpu} out of range; use 0..{len(self.gpus) - 1}")
        return gpu

    def link(self, i: int | str, j: int | str) -> str:
        """Connection label between GPUs ``i`` and ``j`` (indices or names like ``"GPU1"``)."""
        return self.matrix[self._index(i)][self._index(j)]

    def is_nvlink(self, i: int | str, j: int | str) -> bool:
        return self.link(i, j).startswith("NV")

    def link_spec(self, i: int | str, j: int | str, pcie: str = "pcie4") -> LinkSpec:
        """A :class:`LinkSpec` for the pair: NV# -> # x 25 GB/s per direction; any PCIe path ->
        the ``pcie`` preset (a path through the CPU or across sockets is no faster)."""
        label = self.link(i, j)
        if label == "X":
            raise ValueError(f"GPU {i} and GPU {j} are the same device; pick two different GPUs")
        if label.startswith("NV"):
            return LinkSpec(f"nvlink-{label}", nvlink_bandwidth(label), _ALPHA_NVLINK, "nvlink",
                            f"{label}: {label[2:]} bonded NVLinks")
        base = get_link(pcie)
        return LinkSpec(f"{base.name}-{label}", base.bandwidth, base.alpha, "pcie",
                        f"{label}: {CONNECTION_LEVELS[label]}")


def parse_topology(text: str) -> Topology:
    """Parse the matrix printed by ``nvidia-smi topo -m``.

    Works with tab- or space-separated output. Columns after the device columns (CPU
    Affinity, NUMA Affinity, GPU NUMA ID) and NIC rows/columns (``NIC0``, old ``mlx5_0``) are
    dropped; the legend is ignored.
    """
    # A terminal run underlines the header with ANSI escape codes: drop them first.
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line for line in text.splitlines() if line.strip()]
    header_at = next((n for n, line in enumerate(lines)
                      if line.split() and line.split()[0] == "GPU0"), None)
    if header_at is None:
        raise ValueError("no 'GPU0 GPU1 ...' header found; pass the output of `nvidia-smi topo -m`")
    columns: list[str] = []
    for token in lines[header_at].split():
        if not _DEVICE_LABEL.match(token):
            break  # "CPU Affinity" and later columns: not devices
        columns.append(token)

    rows: dict[str, list[str]] = {}
    for line in lines[header_at + 1:]:
        tokens = line.split()
        if tokens[0] not in columns:
            if tokens[0].rstrip(":") in ("Legend", "NIC"):
                break
            continue
        cells = tokens[1:1 + len(columns)]
        if len(cells) < len(columns):
            raise ValueError(f"row {tokens[0]!r} has {len(cells)} entries for {len(columns)} device columns")
        rows[tokens[0]] = cells

    gpu_cols = [n for n, c in enumerate(columns) if c.startswith("GPU")]
    gpus = tuple(columns[n] for n in gpu_cols)
    missing = [g for g in gpus if g not in rows]
    if missing:
        raise ValueError(f"topology has no row for {', '.join(missing)}; is the output complete?")
    matrix = tuple(tuple(rows[g][n] for n in gpu_cols) for g in gpus)
    for i, row in enumerate(matrix):
        for j, label in enumerate(row):
            if (i == j) != (label == "X") or (label != "X" and not (
                    re.fullmatch(r"NV\d+", label) or label in CONNECTION_LEVELS)):
                raise ValueError(
                    f"unexpected entry {label!r} between {gpus[i]} and {gpus[j]}; expected X on "
                    f"the diagonal and NV# or one of {', '.join(CONNECTION_LEVELS)} elsewhere"
                )
    nics = tuple(c for c in columns if not c.startswith("GPU"))
    return Topology(gpus=gpus, matrix=matrix, nics=nics)


def load_topology(path: str) -> Topology:
    """Read a saved ``nvidia-smi topo -m`` output file and parse it."""
    with open(path, encoding="utf-8") as f:
        return parse_topology(f.read())


@dataclass(frozen=True)
class TPVerdict:
    """Whether tensor parallelism over a set of GPUs is advisable, and why."""

    advisable: bool
    reason: str
    weakest_link: str | None  # label of the worst pair, None for a single GPU
    weakest_pair: tuple[int, int] | None


def tp_verdict(topology: Topology, gpus: list[int] | None = None) -> TPVerdict:
    """TP is advisable only when every pair of the chosen GPUs is NVLink-connected (NV#).

    Tensor parallelism puts two all-reduces per layer on the critical path of every token;
    over PCIe, and worse through the CPU (PHB/NODE/SYS), they dominate the step time.
    ``gpus`` are indices into the topology (default: all GPUs).
    """
    chosen = list(range(topology.num_gpus)) if gpus is None else [topology._index(g) for g in gpus]
    if not chosen:
        raise ValueError("choose at least one GPU")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"GPU list {chosen} repeats a GPU; list each one once")
    if len(chosen) == 1:
        return TPVerdict(True, "one GPU: TP degree 1, no tensor-parallel communication", None, None)
    pairs = list(combinations(chosen, 2))
    weakest = min(pairs, key=lambda pair: _strength(topology.link(*pair)))
    label = topology.link(*weakest)
    names = f"{topology.gpus[weakest[0]]}-{topology.gpus[weakest[1]]}"
    if label.startswith("NV"):
        return TPVerdict(True, f"every pair of the {len(chosen)} GPUs is NVLink-connected; weakest is {names} "
                               f"({label}, {nvlink_bandwidth(label) / GB:.0f} GB/s each way)", label, weakest)
    return TPVerdict(False, f"{names} is connected by {label} ({CONNECTION_LEVELS[label]}), not "
                            f"NVLink: keep TP to NVLink-connected GPUs and use PP or DP across "
                            f"this link", label, weakest)
