"""The pipeline simulator against hand timings and the closed-form bubble formulas."""

from __future__ import annotations

import time

import pytest

from shardlab.pipeline import (
    Op,
    Schedule,
    bubble_fraction_closed_form,
    min_microbatches_for_bubble,
    schedule,
    simulate,
)

TIMES = [(1.0, 2.0), (1.0, 1.0), (2.0, 1.0), (1.0, 3.7), (0.3, 0.5)]
TOL = 1e-9


def check_timeline(r, t_p2p=0.0):
    """Every rank runs one op at a time, in schedule order, after its inputs."""
    sched = r.schedule
    end = {t.op: t.end for t in r.timeline}
    for st in range(sched.stages):
        entries = r.stage_timeline(st)
        assert [t.op for t in entries] == list(sched.ops[st])
        for a, b in zip(entries, entries[1:]):
            assert b.start >= a.end - TOL
        for t in entries:
            for d in sched.deps(t.op):
                hop = t_p2p if d.stage != st else 0.0
                assert t.start >= end[d] + hop - TOL
    assert r.makespan == pytest.approx(max(t.end for t in r.timeline))


# --------------------------------------------------------------------------- by hand


def test_1f1b_p2_m2_timeline_by_hand():
    r = simulate(schedule("1f1b", 2, 2), t_forward=1.0, t_backward=2.0)
    got = [(t.stage, t.op.label, t.start, t.end) for t in r.timeline]
    assert got == [
        (0, "F0", 0.0, 1.0), (0, "F1", 1.0, 2.0), (0, "B0", 4.0, 6.0), (0, "B1", 7.0, 9.0),
        (1, "F0", 1.0, 2.0), (1, "B0", 2.0, 4.0), (1, "F1", 4.0, 5.0), (1, "B1", 5.0, 7.0),
    ]  # fmt: skip
    assert r.makespan == 9.0
    assert r.per_stage_busy == (6.0, 6.0)
    assert r.per_stage_idle == (3.0, 3.0)
    assert r.bubble_fraction == pytest.approx(1 / 3)  # (p-1)/(m+p-1)


def test_p4_m16_is_3_over_19():
    for name in ("gpipe", "1f1b"):
        r = simulate(schedule(name, 4, 16))
        assert abs(r.bubble_fraction - 3 / 19) < TOL
    assert bubble_fraction_closed_form("1f1b", 4, 16) == pytest.approx(3 / 19, abs=TOL)


def test_naive_with_p2p_latency_by_hand():
    p, m, tf, tb, hop = 4, 3, 1.0, 2.0, 0.25
    r = simulate(schedule("naive", p, m), tf, tb, t_p2p=hop)
    # Each micro-batch: p forwards, p backwards, 2(p-1) hops, one after another.
    assert r.makespan == pytest.approx(m * (p * (tf + tb) + 2 * (p - 1) * hop), abs=TOL)
    check_timeline(r, t_p2p=hop)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_p2p_latency_slows_the_pipeline(name):
    s = schedule(name, 4, 8)
    base, slow = simulate(s), simulate(s, t_p2p=0.3)
    assert slow.makespan > base.makespan
    assert slow.bubble_fraction > base.bubble_fraction
    check_timeline(slow, t_p2p=0.3)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("p", range(1, 9))
def test_gpipe_1f1b_naive_bubble_closed_forms(p):
    for m in range(1, 33):
        for tf, tb in TIMES:
            for name in ("gpipe", "1f1b"):
                r = simulate(schedule(name, p, m), tf, tb)
                assert abs(r.bubble_fraction - (p - 1) / (m + p - 1)) < TOL, (name, p, m, tf, tb)
                assert abs(r.makespan - (m + p - 1) * (tf + tb)) < TOL
            r = simulate(schedule("naive", p, m), tf, tb)
            assert abs(r.bubble_fraction - (p - 1) / p) < TOL
        for name in ("naive", "gpipe", "1f1b"):
            cf = bubble_fraction_closed_form(name, p, m)
            assert abs(cf - simulate(schedule(name, p, m)).bubble_fraction) < TOL


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_bubble_closed_form(p, v):
    # Megatron interleaved 1F1B: each rank idles (p-1)*(t_f+t_b)/v, so the bubble
    # fraction is (p-1)/(v*m+p-1). m must be a multiple of p.
    for m in range(p, 33, p):
        for tf, tb in TIMES:
            r = simulate(schedule("interleaved-1f1b", p, m, v), tf, tb)
            idle = (p - 1) * (tf + tb) / v
            assert abs(r.makespan - (m * (tf + tb) + idle)) < TOL, (p, v, m, tf, tb)
            assert abs(r.bubble_fraction - (p - 1) / (v * m + p - 1)) < TOL
            assert abs(bubble_fraction_closed_form("interleaved-1f1b", p, m, v) - r.bubble_fraction) < TOL
            if p > 1:
                assert r.bubble_fraction < simulate(schedule("1f1b", p, m), tf, tb).bubble_fraction


ZB_TIMES = [  # (t_forward, t_backward, t_weight) with t_W <= t_F and t_W <= t_B = t_backward - t_W
    (1.0, 2.0, 1.0), (1.0, 2.0, 0.5), (1.0, 2.0, 0.0), (2.0, 3.0, 1.5), (1.0, 3.0, 1.0), (0.7, 1.6, 0.7),
]  # fmt: skip


@pytest.mark.parametrize("p", range(1, 9))
def test_zb_h1_bubble_closed_form(p):
    # Each rank idles (p-1)*(t_F + t_B - t_W) instead of 1F1B's (p-1)*(t_F + t_B + t_W).
    for m in range(p, 33):
        for tf, tb, tw in ZB_TIMES:
            r = simulate(schedule("zb-h1", p, m), tf, tb, t_weight=tw)
            idle = (p - 1) * (tf + (tb - tw) - tw)
            assert abs(r.makespan - (m * (tf + tb) + idle)) < TOL, (p, m, tf, tb, tw)
            assert abs(r.bubble_fraction - idle / (m * (tf + tb) + idle)) < TOL
            cf = bubble_fraction_closed_form("zb-h1", p, m, t_forward=tf, t_backward=tb, t_weight=tw)
            assert abs(cf - r.bubble_fraction) < TOL


def test_zb_h1_beats_1f1b_with_equal_f_b_w():
    # t_F = t_B = t_W = 1 (so the full backward is 2): a third of 1F1B's idle time.
    for p, m in [(4, 16), (8, 32), (2, 2), (6, 7)]:
        zb = simulate(schedule("zb-h1", p, m), 1.0, 2.0, t_weight=1.0)
        ob = simulate(schedule("1f1b", p, m), 1.0, 2.0)
        assert zb.bubble_fraction < ob.bubble_fraction
        assert abs(zb.bubble_fraction - (p - 1) / (3 * m + p - 1)) < TOL
        assert abs(sum(zb.per_stage_idle) - sum(ob.per_stage_idle) / 3) < TOL
    assert simulate(schedule("zb-h1", 4, 16), t_weight=1.0).bubble_fraction == pytest.approx(3 / 51)


def test_zb_h1_closed_form_refuses_where_it_does_not_hold():
    with pytest.raises(ValueError, match="m >= p"):
        bubble_fraction_closed_form("zb-h1", 4, 3)
    with pytest.raises(ValueError, match="t_weight <= t_forward"):
        bubble_fraction_closed_form("zb-h1", 4, 8, t_forward=0.5, t_backward=2.0, t_weight=1.0)
    # ...and there the simulator indeed gives something else.
    r = simulate(schedule("zb-h1", 4, 8), 0.5, 2.0, t_weight=1.0)
    idle = 3 * (0.5 + 1.0 - 1.0)
    assert abs(r.bubble_fraction - idle / (8 * 2.5 + idle)) > 1e-3


@pytest.mark.parametrize(
    "name,p,m,v",
    [("gpipe", 3, 5, 1), ("1f1b", 4, 9, 1), ("interleaved-1f1b", 3, 6, 2), ("interleaved-1f1b", 2, 4, 4), ("zb-h1", 4, 6, 1)],
)
def test_timeline_is_consistent_and_work_per_rank_is_independent_of_chunks(name, p, m, v):
    tf, tb, tw = 1.5, 2.5, 1.0
    r = simulate(schedule(name, p, m, v), tf, tb, t_weight=tw)
    check_timeline(r)
    for busy in r.per_stage_busy:
        assert abs(busy - m * (tf + tb)) < TOL
    by_kind = {t.op.kind: t.duration for t in r.timeline}
    assert by_kind["F"] == pytest.approx(tf / v)
    if name == "zb-h1":
        assert by_kind["B"] == pytest.approx((tb - tw) / v)
        assert by_kind["W"] == pytest.approx(tw / v)
    else:
        assert by_kind["B"] == pytest.approx(tb / v)  # t_weight ignored without W ops


def test_t_weight_defaults_to_half_the_backward():
    r = simulate(schedule("zb-h1", 2, 2), 1.0, 3.0)
    by_kind = {t.op.kind: t.duration for t in r.timeline}
    assert by_kind == {"F": 1.0, "B": 1.5, "W": 1.5}


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("p", range(1, 9))
def test_peak_activations(p):
    for m in range(1, 33):
        assert simulate(schedule("gpipe", p, m)).peak_activations == (m,) * p
        assert simulate(schedule("1f1b", p, m)).peak_activations == tuple(min(p - s, m) for s in range(p))
        assert simulate(schedule("naive", p, m)).peak_activations == (1,) * p
        # ZB-H1 holds a micro-batch until its W: p on every rank, the peak of 1F1B's rank 0.
        zb = simulate(schedule("zb-h1", p, m)).peak_activations
        assert zb == (min(p, m),) * p
        assert max(zb) == max(simulate(schedule("1f1b", p, m)).peak_activations)


@pytest.mark.parametrize("p,v", [(1, 2), (2, 2), (4, 2), (4, 3), (3, 4), (8, 2)])
def test_interleaved_peak_activations_in_micro_batch_chunks(p, v):
    for m in range(p, 25, p):
        r = simulate(schedule("interleaved-1f1b", p, m, v))
        expected = tuple(min(2 * (p - 1 - s) + (v - 1) * p + 1, v * m) for s in range(p))
        assert r.peak_activations == expected
        assert r.peak_activation_memory == pytest.approx([e / v for e in expected])
        assert all(1 <= x <= v * m for x in r.peak_activations)


def test_peak_counts_from_f_start_to_b_end():
    # Hand-built two-op lists on one stage: held 1 while F0..B0 runs, never 2.
    s = Schedule("custom", 1, 2, 1, ((Op("F", 0), Op("B", 0), Op("F", 1), Op("B", 1)),))
    assert simulate(s).peak_activations == (1,)
    s = Schedule("custom", 1, 2, 1, ((Op("F", 0), Op("F", 1), Op("B", 0), Op("B", 1)),))
    assert simulate(s).peak_activations == (2,)


# --------------------------------------------------------------------------- helpers


def test_min_microbatches_for_bubble():
    # 3/(m+3) < 0.2  <=>  m > 12
    assert min_microbatches_for_bubble("gpipe", 4, 0.2) == 13
    assert min_microbatches_for_bubble("1f1b", 4, 0.2) == 13
    assert min_microbatches_for_bubble("1f1b", 1, 0.01) == 1
    # interleaved: multiples of p only. 3/(2m+3) < 0.05 <=> m > 28.5 -> 32
    assert min_microbatches_for_bubble("interleaved-1f1b", 4, 0.05, v=2) == 32
    assert min_microbatches_for_bubble("naive", 4, 0.8) == 1
    with pytest.raises(ValueError, match="naive"):
        min_microbatches_for_bubble("naive", 4, 0.5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="target"):
            min_microbatches_for_bubble("1f1b", 4, bad)


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3), ("zb-h1", 1)])
def test_min_microbatches_matches_brute_force(name, v):
    for p in range(1, 9):
        for target in (0.5, 0.3, 0.1, 0.05, 0.01):
            m = min_microbatches_for_bubble(name, p, target, v)
            candidates = [
                k for k in range(1, 2000)
                if (name != "interleaved-1f1b" or k % p == 0) and (name != "zb-h1" or k >= p)
            ]  # fmt: skip
            best = next(k for k in candidates if bubble_fraction_closed_form(name, p, k, v) < target)
            assert m == best, (name, p, target)
            # And the simulator agrees that m gets under the target.
            assert simulate(schedule(name, p, m, v)).bubble_fraction < target + TOL


def test_closed_form_checks_arguments_like_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        bubble_fraction_closed_form("dualpipe", 4, 8)
    with pytest.raises(ValueError, match="multiple of stages"):
        bubble_fraction_closed_form("interleaved-1f1b", 4, 6, 2)
    with pytest.raises(ValueError, match="use chunks=1"):
        bubble_fraction_closed_form("1f1b", 4, 8, 2)


# --------------------------------------------------------------------------- errors, speed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(t_forward=0.0), "t_forward"),
        (dict(t_backward=-1.0), "t_backward"),
        (dict(t_weight=-0.5), "t_weight"),
        (dict(t_weight=3.0), "cannot be larger"),
        (dict(t_p2p=-1.0), "t_p2p"),
        (dict(t_forward=float("nan")), "t_forward"),
    ],
)
def test_simulate_rejects_bad_times(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(schedule("zb-h1", 2, 2), **kwargs)


def test_simulate_rejects_a_deadlocked_schedule():
    g = schedule("gpipe", 2, 2)
    bad = Schedule(g.name, 2, 2, 1, (g.ops[0], tuple(reversed(g.ops[1]))))
    with pytest.raises(ValueError, match="deadlock"):
        simulate(bad)


def test_speed_p64_m1024(capsys):
    t0 = time.perf_counter()
    r = simulate(schedule("1f1b", 64, 1024))
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n1f1b p=64 m=1024 ({len(r.timeline)} ops): schedule + simulate {elapsed:.3f} s")
    assert abs(r.bubble_fraction - 63 / 1087) < TOL
    assert elapsed < 3.0
