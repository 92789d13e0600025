"""Unit tests for shardlab.hardware: link and GPU presets, nvidia-smi topology parsing."""

from pathlib import Path

import pytest

from shardlab.hardware import (
    GB,
    GPUS,
    LINKS,
    LinkSpec,
    gbit_per_s,
    get_gpu,
    get_link,
    load_topology,
    nvlink_bandwidth,
    parse_topology,
    tp_verdict,
)

FIXTURES = Path(__file__).parent / "fixtures"


def topo(name):
    return load_topology(FIXTURES / f"nvidia-smi-topo-{name}.txt")


# ---------------------------------------------------------------------------- links
def test_contract_link_keys_and_per_direction_bandwidths():
    expected_gb = {"nvlink-a100": 300, "nvlink-h100": 450, "pcie4": 32, "pcie5": 64,
                   "ib-hdr": 25, "ib-ndr": 50}
    assert set(expected_gb) <= set(LINKS)
    for key, gb in expected_gb.items():
        assert LINKS[key].bandwidth == pytest.approx(gb * GB), key


def test_bidirectional_is_twice_per_direction():
    # Errata 2 and 4: 600 GB/s (A100) and 64 GB/s (PCIe 4) count both directions.
    assert LINKS["nvlink-a100"].bidirectional == pytest.approx(600 * GB)
    assert LINKS["nvlink-h100"].bidirectional == pytest.approx(900 * GB)
    assert LINKS["pcie4"].bidirectional == pytest.approx(64 * GB)
    assert LINKS["pcie4"].bandwidth == pytest.approx(LINKS["pcie4"].bidirectional / 2)


def test_errata3_infiniband_bits_not_bytes():
    assert gbit_per_s(200) == 25 * GB
    assert LINKS["ib-hdr"].bandwidth * 8 == pytest.approx(200e9)
    # the "200 GB/s" claim is off by a factor of 8
    assert 200 * GB / LINKS["ib-hdr"].bandwidth == pytest.approx(8)


def test_latency_presets_are_microseconds():
    for link in LINKS.values():
        assert 1e-7 < link.alpha < 2e-5, link.name
    assert LINKS["ib-ndr"].alpha >= LINKS["nvlink-h100"].alpha


def test_get_link_and_errors():
    assert get_link("pcie5") is LINKS["pcie5"]
    custom = LinkSpec("mine", 10 * GB, 1e-6)
    assert get_link(custom) is custom
    with pytest.raises(ValueError, match="nvlink-h100"):
        get_link("nvlink")
    with pytest.raises(ValueError, match="bandwidth"):
        LinkSpec("bad", 0, 1e-6)
    with pytest.raises(ValueError, match="alpha"):
        LinkSpec("bad", 1e9, -1)


def test_nvlink_bandwidth_from_label():
    assert nvlink_bandwidth("NV18") == pytest.approx(LINKS["nvlink-h100"].bandwidth)
    assert nvlink_bandwidth("NV12") == pytest.approx(LINKS["nvlink-a100"].bandwidth)
    with pytest.raises(ValueError, match="NV18"):
        nvlink_bandwidth("PIX")


def test_gpu_presets():
    assert get_gpu("h100-80gb").memory_gb == 80
    assert get_gpu("h200-141gb").memory_bytes > get_gpu("h100-80gb").memory_bytes
    for g in GPUS.values():
        assert g.link in LINKS
        assert g.hbm_bandwidth > 0 and g.bf16_flops > 1e14
    with pytest.raises(ValueError, match="h100-80gb"):
        get_gpu("H100")


# ---------------------------------------------------------------------------- topology
def test_parse_2xh100_fixture():
    t = topo("2xH100")
    assert t.gpus == ("GPU0", "GPU1")
    assert t.link(0, 1) == "NV18" == t.link("GPU1", "GPU0")
    assert t.link(0, 0) == "X"
    assert t.link_spec(0, 1).bandwidth == pytest.approx(450 * GB)
    v = tp_verdict(t)
    assert v.advisable and v.weakest_link == "NV18"


def test_parse_8x_dgx_fixture_ignores_nics():
    t = topo("8xH100-dgx")
    assert t.num_gpus == 8
    assert len(t.nics) == 10
    assert all(t.link(i, j) == "NV18" for i in range(8) for j in range(8) if i != j)
    v = tp_verdict(t)
    assert v.advisable
    assert "8 GPUs" in v.reason


def test_pcie_box_fixture():
    t = topo("4xL40S-pcie")
    assert t.gpus == ("GPU0", "GPU1", "GPU2", "GPU3")
    assert t.nics == ("NIC0",)
    assert [t.link(0, j) for j in (1, 2, 3)] == ["PXB", "PHB", "SYS"]
    v = tp_verdict(t)
    assert not v.advisable
    assert v.weakest_link == "SYS" and 3 in v.weakest_pair
    assert "NVLink" in v.reason
    # even the best pair is PCIe: still not advisable
    pair = tp_verdict(t, [0, 1])
    assert not pair.advisable and pair.weakest_link == "PXB"
    assert t.link_spec(0, 1).bandwidth == LINKS["pcie4"].bandwidth


def test_nvlink_bridge_pairs_fixture():
    t = topo("4xA6000-nvbridge")
    assert tp_verdict(t, [0, 1]).advisable
    assert tp_verdict(t, [2, 3]).advisable
    whole = tp_verdict(t)
    assert not whole.advisable and whole.weakest_link == "NODE"
    assert not tp_verdict(t, [1, 2]).advisable


def test_single_gpu_verdict():
    v = tp_verdict(topo("2xH100"), [1])
    assert v.advisable and v.weakest_link is None


def test_space_separated_output_parses():
    text = (FIXTURES / "nvidia-smi-topo-4xL40S-pcie.txt").read_text().replace("\t", "   ")
    t = parse_topology(text)
    assert t.link(1, 2) == "PHB"


def test_topology_bad_inputs():
    with pytest.raises(ValueError, match="nvidia-smi topo -m"):
        parse_topology("no gpus here")
    bad = "\tGPU0\tGPU1\nGPU0\t X \tQQ\nGPU1\tQQ\t X \n"
    with pytest.raises(ValueError, match="NV#"):
        parse_topology(bad)
    t = topo("2xH100")
    with pytest.raises(ValueError, match="0..1"):
        t.link(0, 5)
    with pytest.raises(ValueError, match="once"):
        tp_verdict(t, [0, 0])
    with pytest.raises(ValueError, match="same device"):
        t.link_spec(1, 1)


def test_topology_with_terminal_underline_codes_parses():
    from pathlib import Path

    from shardlab.hardware import parse_topology

    text = (Path(__file__).parent / "fixtures" / "nvidia-smi-topo-2xH100.txt").read_text()
    underlined = text.replace("\tGPU0\tGPU1", "\t\x1b[4mGPU0\tGPU1", 1).replace("GPU NUMA ID", "GPU NUMA ID\x1b[0m", 1)
    assert "\x1b[4m" in underlined
    assert parse_topology(underlined).link(0, 1) == "NV18"
