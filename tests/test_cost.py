"""Unit tests for shardlab.cost: collective bytes and times, calibration, layer arithmetic."""

import numpy as np
import pytest

from shardlab.cost import (
    MEASURED_ALLREDUCE_2XH100,
    CollectiveModel,
    allgather_bytes,
    allgather_time,
    allreduce_bytes,
    allreduce_time,
    alltoall_bytes,
    alltoall_time,
    bus_bandwidth,
    calibrated_2xh100,
    collective_time,
    decode_allreduce_cost,
    ep_alltoall_cost,
    fit_alpha_beta,
    forward_flops,
    p2p_bytes,
    p2p_time,
    prefill_allreduce_cost,
    reduce_scatter_bytes,
    reduce_scatter_time,
    relative_error,
    roofline_time,
    tp_comm_cost,
    tp_step_estimate,
)
from shardlab.hardware import GB, LINKS, LinkSpec
from shardlab.memory import parameter_count, weight_bytes

KiB = 1024


# ---------------------------------------------------------------------------- bytes
def test_allreduce_bytes_contract():
    assert allreduce_bytes(16 * KiB, 4) == 1.5 * 16 * KiB
    assert allreduce_bytes(1000, 2) == 1000
    assert allreduce_bytes(1000, 1) == 0
    assert allreduce_bytes(800, 8) == pytest.approx(2 * 7 / 8 * 800)


def test_half_collectives_and_alltoall_and_p2p():
    for fn in (allgather_bytes, reduce_scatter_bytes, alltoall_bytes):
        assert fn(1000, 4) == 750
        assert fn(1000, 1) == 0
    # all-reduce = reduce-scatter + all-gather (errata 8: same volume)
    assert reduce_scatter_bytes(4096, 8) + allgather_bytes(4096, 8) == allreduce_bytes(4096, 8)
    assert p2p_bytes(123) == 123


def test_bytes_bad_inputs():
    with pytest.raises(ValueError, match="positive int"):
        allreduce_bytes(10, 0)
    with pytest.raises(ValueError, match=">= 0"):
        allreduce_bytes(-1, 2)


# ---------------------------------------------------------------------------- times
def test_allreduce_time_formula():
    link = LinkSpec("test", 100 * GB, 5e-6)
    s, p = 64 * 2**20, 4
    assert allreduce_time(s, p, link) == pytest.approx(2 * (p - 1) * 5e-6 + 2 * (p - 1) / p * s / (100 * GB))
    half = (p - 1) * 5e-6 + (p - 1) / p * s / (100 * GB)
    assert allgather_time(s, p, link) == pytest.approx(half)
    assert reduce_scatter_time(s, p, link) == pytest.approx(half)
    assert alltoall_time(s, p, link) == pytest.approx(half)
    assert allreduce_time(s, p, link) == pytest.approx(allgather_time(s, p, link) + reduce_scatter_time(s, p, link))
    assert p2p_time(s, link) == pytest.approx(5e-6 + s / (100 * GB))


def test_one_rank_costs_nothing():
    for fn in (allreduce_time, allgather_time, reduce_scatter_time, alltoall_time):
        assert fn(2**30, 1, "nvlink-h100") == 0


def test_time_accepts_key_and_spec_and_arrays():
    assert allreduce_time(1e6, 8, "nvlink-h100") == allreduce_time(1e6, 8, LINKS["nvlink-h100"])
    t = allreduce_time(np.array([1e3, 1e6, 1e9]), 8, "ib-ndr")
    assert t.shape == (3,) and np.all(np.diff(t) > 0)
    with pytest.raises(ValueError, match="pcie4"):
        allreduce_time(1e6, 2, "pcie-4")
    with pytest.raises(ValueError, match="allreduce"):
        collective_time("broadcast", 1e6, 2, "pcie4")


def test_pcie_slower_than_nvlink_for_large_messages():
    assert allreduce_time(2**30, 4, "pcie4") > 10 * allreduce_time(2**30, 4, "nvlink-h100")


# ---------------------------------------------------------------------------- calibration
def test_fit_recovers_synthetic_alpha_beta():
    alpha, bw, p = 7e-6, 200 * GB, 8
    sizes = np.logspace(3, 9, 13)
    truth = CollectiveModel("truth", fallback=LinkSpec("truth", bw, alpha))
    times = collective_time("allreduce", sizes, p, truth)
    model = fit_alpha_beta(sizes, times, p, "allreduce")
    ab = model.alpha_beta("allreduce")
    assert ab.alpha == pytest.approx(alpha, rel=1e-6)
    assert ab.bandwidth == pytest.approx(bw, rel=1e-6)
    assert np.max(relative_error(model.predict(sizes), times)) < 1e-6
    # the same for another collective, with noise, unweighted
    rng = np.random.default_rng(0)
    noisy = collective_time("allgather", sizes, p, truth) * (1 + 0.01 * rng.standard_normal(sizes.size))
    m2 = fit_alpha_beta(sizes, noisy, p, "allgather", relative=False)
    assert m2.alpha_beta("allgather").bandwidth == pytest.approx(bw, rel=0.05)


def test_fit_is_non_negative():
    # times that fall with size would need a negative bandwidth term: clamp it to zero
    m = fit_alpha_beta([1e3, 1e6, 1e9], [3e-5, 2e-5, 1e-5], 2)
    ab = m.alpha_beta("allreduce")
    assert ab.alpha >= 0 and ab.beta >= 0


def test_minimax_fit_recovers_exact_data_and_minimises_the_worst_error():
    alpha, bw, p = 7e-6, 200 * GB, 8
    sizes = np.logspace(3, 9, 13)
    truth = CollectiveModel("truth", fallback=LinkSpec("truth", bw, alpha))
    times = collective_time("allreduce", sizes, p, truth)
    ab = fit_alpha_beta(sizes, times, p, objective="minimax").alpha_beta("allreduce")
    assert ab.alpha == pytest.approx(alpha, rel=1e-3)
    assert ab.bandwidth == pytest.approx(bw, rel=1e-3)
    # Noisy, size-dependent data: minimax has the smallest worst error of the three fits,
    # and that error is the best achievable (an equioscillating +/- e fit).
    rng = np.random.default_rng(1)
    noisy = times * (1 + 0.3 * rng.uniform(-1, 1, sizes.size))
    worst = {obj: float(np.max(relative_error(
        fit_alpha_beta(sizes, noisy, p, objective=obj).predict(sizes), noisy)))
        for obj in ("relative", "absolute", "minimax")}
    assert worst["minimax"] <= min(worst["relative"], worst["absolute"]) + 1e-9
    errors = fit_alpha_beta(sizes, noisy, p, objective="minimax").predict(sizes) / noisy - 1
    assert np.sum(np.isclose(np.abs(errors), worst["minimax"], rtol=1e-3)) >= 3
    with pytest.raises(ValueError, match="unknown objective 'l1'"):
        fit_alpha_beta(sizes, times, p, objective="l1")


def test_fit_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        fit_alpha_beta([1e3], [1e-5], 2)
    with pytest.raises(ValueError, match="p >= 2"):
        fit_alpha_beta([1e3, 1e6], [1e-5, 1e-4], 1)
    with pytest.raises(ValueError, match="> 0"):
        fit_alpha_beta([1e3, 1e6], [0, 1e-4], 2)
    m = fit_alpha_beta([1e3, 1e6], [1e-5, 1e-4], 2)
    with pytest.raises(ValueError, match="alltoall"):
        m.alpha_beta("alltoall")


def test_calibrated_2xh100_fits_measurements():
    m = calibrated_2xh100()
    meas = MEASURED_ALLREDUCE_2XH100
    err = relative_error(m.predict(np.array(meas["sizes"])), meas["times"])
    assert np.max(err) < 0.3
    ab = m.alpha_beta("allreduce")
    # measured latency: tens of microseconds per call, far above the preset per-step alpha
    assert 2 * ab.alpha > 5 * LINKS["nvlink-h100"].alpha
    assert 250 * GB < ab.bandwidth < LINKS["nvlink-h100"].bandwidth
    # other collectives fall back to the preset
    assert m.alpha_beta("allgather").bandwidth == LINKS["nvlink-h100"].bandwidth


def test_errata2_bus_bandwidth_below_link():
    meas = MEASURED_ALLREDUCE_2XH100
    busbw = {s: bus_bandwidth(s, t, meas["p"]) for s, t in zip(meas["sizes"], meas["times"])}
    assert round(busbw[2**30] / GB) == 331  # "332 GB/s at 1 GiB"
    assert round(busbw[8 * 2**20] / GB) == 140  # "141 GB/s at 8 MiB"
    assert max(busbw.values()) < LINKS["nvlink-h100"].bandwidth < LINKS["nvlink-a100"].bidirectional * 1.5
    # the 600 GB/s A100 figure is twice the per-direction link
    assert LINKS["nvlink-a100"].bidirectional / LINKS["nvlink-a100"].bandwidth == 2


# ---------------------------------------------------------------------------- TP arithmetic
def test_errata1_and_5_decode_tp4_70b():
    c = decode_allreduce_cost("llama3-70b", tp=4, batch=1, link="nvlink-h100")
    assert c.count == 160
    assert c.message_bytes == 16 * KiB
    assert c.payload_bytes == 160 * 16 * KiB
    assert round(c.payload_bytes / 1e6, 1) == 2.6
    assert c.bytes_sent_per_rank == 160 * 1.5 * 16 * KiB
    assert round(c.bytes_sent_per_rank / 1e6, 1) == 3.9  # not 19.2 MB
    # bandwidth term alone: microseconds ("about 0 ms")...
    assert c.bandwidth_time < 20e-6
    # ...but 160 x 2(p-1) latency steps cost milliseconds: latency-bound
    assert c.latency_time == pytest.approx(160 * 6 * LINKS["nvlink-h100"].alpha)
    assert c.latency_time > 1e-3
    assert c.latency_fraction > 0.99
    # with the measured 2 x H100 latency at TP=2: about 160 x 65 us, i.e. ~10 ms per token
    measured = decode_allreduce_cost("llama3-70b", 2, 1, calibrated_2xh100())
    assert 5e-3 < measured.total_time < 15e-3


def test_errata6_decode_vs_prefill_over_pcie():
    decode = decode_allreduce_cost("llama3-70b", tp=4, batch=32, link="pcie4")
    prefill = prefill_allreduce_cost("llama3-70b", tp=4, prompt_len=2048, link="pcie4")
    assert prefill.message_bytes == 64 * decode.message_bytes
    assert prefill.bandwidth_time == pytest.approx(64 * decode.bandwidth_time)
    assert 1e-3 < decode.bandwidth_time < 5e-3  # milliseconds per decode step
    assert prefill.bandwidth_time > 100e-3  # well over 100 ms for the prefill
    # prefill is bandwidth-bound, a batch-1 decode latency-bound
    assert prefill.latency_fraction < 0.05
    assert decode_allreduce_cost("llama3-70b", 4, 1, "pcie4").latency_fraction > 0.5


def test_prefill_messages_2048x_decode():
    d = decode_allreduce_cost("llama3-70b", 4, 1, "nvlink-h100")
    p = prefill_allreduce_cost("llama3-70b", 4, 2048, "nvlink-h100")
    assert p.count == d.count
    assert p.message_bytes == 2048 * d.message_bytes


def test_sequence_parallel_same_bytes_twice_the_collectives():
    ar = tp_comm_cost("llama3-70b", 8, 4096, "nvlink-h100")
    sp = tp_comm_cost("llama3-70b", 8, 4096, "nvlink-h100", sp=True)
    assert sp.count == 2 * ar.count
    assert sp.bytes_sent_per_rank == pytest.approx(ar.bytes_sent_per_rank)
    assert sp.total_time == pytest.approx(ar.total_time)


def test_tp1_has_no_communication():
    c = tp_comm_cost("llama3-8b", 1, 128, "pcie4")
    assert c.count == 0 and c.total_time == 0


def test_ep_alltoall():
    c = ep_alltoall_cost("mixtral-8x7b", 8, 16, "nvlink-h100")
    assert c.count == 64  # dispatch + combine per layer
    assert c.message_bytes == 16 * 2 * 4096 * 2
    assert c.bytes_sent_per_rank == pytest.approx(64 * 7 / 8 * c.message_bytes)
    with pytest.raises(ValueError, match="mixtral"):
        ep_alltoall_cost("llama3-8b", 2, 1, "pcie4")


# ---------------------------------------------------------------------------- compute
def test_forward_flops_about_2n_per_token():
    f = forward_flops("llama3-70b", batch=1, new_tokens=1, context_len=0)
    non_embedding = parameter_count("llama3-70b") - 128256 * 8192
    assert f == pytest.approx(2 * non_embedding, rel=1e-3)
    assert forward_flops("llama3-70b", 1, 1, 8192) > f


def test_roofline_decode_memory_bound_and_prefill_compute_bound():
    dec = roofline_time("llama3-70b", "h100-80gb", batch=1, tp=4)
    assert dec.bound == "memory"
    # a quarter of the weights (all but the embedding table, of which a token reads one row)
    # read at HBM speed; the batch-1 KV cache of one token is negligible
    read = weight_bytes("llama3-70b") - 2 * 128256 * 8192
    assert dec.memory_time == pytest.approx(read / 4 / 3.35e12, rel=1e-3)
    pre = roofline_time("llama3-70b", "h100-80gb", batch=1, new_tokens=2048, tp=4)
    assert pre.bound == "compute"
    assert roofline_time("llama3-70b", "h100-80gb", tp=8).time < dec.time


def test_step_estimate_decode_comm_comparable_to_compute():
    est = tp_step_estimate("llama3-70b", "h100-80gb", 4, calibrated_2xh100(), context_len=2048)
    assert est.total_time == pytest.approx(est.compute.time + est.comm.total_time)
    assert est.comm_fraction > 0.3  # milliseconds of latency next to ~10 ms of compute
