"""The real pipeline executor on mock devices: every schedule reproduces the single-device
step, measured peak activations follow the simulator, and PyTorch's own schedules run the
same op orders."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from shardlab.pipeline import execution_order, schedule, simulate
from shardlab.pipeline import executor as ex
from shardlab.pipeline import torch_compare as tc

# (name, microbatches, chunks) per stage count: every schedule, including m < p and v = 3.
CASES = {
    2: [("naive", 3, 1), ("gpipe", 4, 1), ("1f1b", 4, 1), ("1f1b", 1, 1),
        ("interleaved-1f1b", 4, 2), ("interleaved-1f1b", 2, 3), ("zb-h1", 4, 1), ("zb-h1", 1, 1)],
    4: [("naive", 2, 1), ("gpipe", 6, 1), ("1f1b", 8, 1), ("1f1b", 2, 1),
        ("interleaved-1f1b", 8, 2), ("zb-h1", 8, 1), ("zb-h1", 3, 1)],
}
PARAMS = [(p, *case) for p, cases in CASES.items() for case in cases]


def model_for(p: int, v: int, kind: str = "mlp"):
    return ex.block_stack(layers=2 * p * v, hidden=16, kind=kind, seed=p + v)


def check_against_reference(run, model, x, y):
    loss, grads = ex.reference_step(model, x, y)
    assert_close(torch.tensor(run.loss), torch.tensor(loss))
    assert run.grads.keys() == grads.keys()
    for name, g in grads.items():
        assert_close(run.grads[name], g, msg=lambda m: f"{name}: {m}")


def check_timeline(run):
    sched = run.schedule
    end = {t.op: t.end for t in run.timeline}
    for s in range(sched.stages):
        entries = run.stage_timeline(s)
        assert [t.op for t in entries] == list(sched.ops[s])  # ran in the schedule's order
        for a, b in zip(entries, entries[1:]):
            assert b.start >= a.end
        for t in entries:  # a cross-rank input was ready before the op started (one clock)
            for d in sched.deps(t.op):
                assert t.start >= end[d]


@pytest.mark.parametrize("p,name,m,v", PARAMS, ids=[f"p{p}-{n}-m{m}-v{v}" for p, n, m, v in PARAMS])
def test_step_matches_single_device_and_simulator(clusters, p, name, m, v):
    model = model_for(p, v)
    x, y = ex.example_batch(model, batch=2 * m, seed=m)
    sched = schedule(name, p, m, v)
    run = ex.run_pipeline(clusters(p), model, x, y, sched)
    check_against_reference(run, model, x, y)
    check_timeline(run)
    # Measured peak of saved activations, in units of one F's worth = the simulator's.
    assert run.peak_activations == tuple(float(k) for k in simulate(sched).peak_activations)
    assert all(u > 0 for u in run.activation_unit_bytes)
    # Every message went out once and came in once.
    sent = sum(r.comm.get("isend", {}).get("calls", 0) for r in run.reports)
    received = sum(r.comm.get("irecv", {}).get("calls", 0) for r in run.reports)
    cross = sum(1 for msgs in ex.messages(sched).values() for msg in msgs if msg.src != msg.dst)
    assert sent == received == cross


def test_replay_keeps_durations_and_closes_the_gaps(clusters):
    model = model_for(2, 1)
    x, y = ex.example_batch(model, batch=8)
    run = ex.run_pipeline(clusters(2), model, x, y, schedule("1f1b", 2, 8))
    replayed = ex.PipelineRun.replay(run)
    dur = {t.op: t.end - t.start for t in run.timeline}
    end = {t.op: t.end for t in replayed}
    for t in replayed:
        assert t.end - t.start == pytest.approx(dur[t.op])
        for d in run.schedule.deps(t.op):
            assert t.start >= end[d] - 1e-12
    assert max(end.values()) <= run.makespan + 1e-9
    assert 0 <= run.replay_bubble() <= run.bubble_fraction + 1e-9
    assert run.hop_latency() >= 0


def test_gpipe_holds_m_and_1f1b_holds_p_minus_stage(clusters):
    p, m = 4, 8
    model = model_for(p, 1)
    x, y = ex.example_batch(model, batch=m)
    gpipe = ex.run_pipeline(clusters(p), model, x, y, schedule("gpipe", p, m))
    one = ex.run_pipeline(clusters(p), model, x, y, schedule("1f1b", p, m))
    assert gpipe.peak_activations == (m,) * p
    assert one.peak_activations == tuple(float(p - s) for s in range(p))
    # Same bytes per F (same layers, same micro-batch): the bytes follow the counts.
    assert gpipe.activation_unit_bytes == one.activation_unit_bytes
    assert gpipe.peak_activation_bytes[0] == m * gpipe.activation_unit_bytes[0]
    assert one.peak_activation_bytes[0] == p * one.activation_unit_bytes[0]


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)])
def test_transformer_blocks(clusters, name, v):
    # Attention saves its own output for the backward pass: the count must still drop
    # to zero when the graph goes (no reference cycle through the saved tensors).
    model = model_for(2, v, kind="transformer")
    x, y = ex.example_batch(model, batch=4, seq=5)
    reports = clusters(2).run(ex.train_step, model, x, y, name, microbatches=4, chunks=v)
    run = ex.collect(schedule(name, 2, 4, v), reports)
    check_against_reference(run, model, x, y)
    assert run.peak_activations == tuple(float(k) for k in simulate(run.schedule).peak_activations)
    assert all(r.memory_trace[-1][1] == 0 for r in run.reports)


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)])
def test_messages_follow_the_dependencies(name, v):
    sched = schedule(name, 4, 8, v)
    msgs = ex.messages(sched)
    assert sum(len(out) for out in msgs.values()) == 2 * (sched.virtual_stages - 1) * sched.microbatches
    # Every message is sent by the op that produces it and needed by exactly one op
    # on the receiving rank: the cross-rank dependencies of the schedule.
    needed = {}
    for s, ops in enumerate(sched.ops):
        for op in ops:
            for d in sched.deps(op):
                if sched.virtual_stage(d) != sched.virtual_stage(op):
                    needed[(d, op)] = s
    assert len(needed) == sum(len(out) for out in msgs.values())
    for s, out in msgs.items():
        for msg in out:
            assert msg.src == s and msg.direction == ("up" if msg.dst > msg.src else "down")
    assert len(execution_order(sched)) == sum(len(ops) for ops in sched.ops)  # no deadlock


def test_partition_and_errors(clusters):
    assert ex.partition_layers(10, 4) == (range(0, 3), range(3, 6), range(6, 8), range(8, 10))
    with pytest.raises(ValueError, match="at least 8 layers"):
        ex.partition_layers(4, 8)
    with pytest.raises(ValueError, match="no `layers`"):
        ex.stage_layers(torch.nn.Linear(2, 2), 2, 1, 0)
    model = model_for(2, 1)
    x, y = ex.example_batch(model, batch=6)
    with pytest.raises(Exception, match="multiple of 4"):
        clusters(2).run(ex.train_step, model, x, y, schedule("gpipe", 2, 4))
    with pytest.raises(Exception, match="stages=2"):
        clusters(2).run(ex.train_step, model, x[:4], y[:4], schedule("gpipe", 4, 4))


# --------------------------------------------------------------------------- torch.distributed.pipelining

TORCH_CASES = [(2, "gpipe", 4, 1), (2, "1f1b", 4, 1), (2, "interleaved-1f1b", 4, 2), (2, "zb-h1", 4, 1),
               (4, "gpipe", 4, 1), (4, "1f1b", 8, 1), (4, "interleaved-1f1b", 8, 2), (4, "zb-h1", 8, 1)]


@pytest.mark.parametrize("p,name,m,v", TORCH_CASES, ids=[f"p{p}-{n}" for p, n, _, _ in TORCH_CASES])
def test_torch_pipelining_runs_our_order(clusters, p, name, m, v):
    model = model_for(p, v)
    x, y = ex.example_batch(model, batch=m)
    res = clusters(p).run(tc.torch_train_step, model, x, y, name, m, v)
    ours = schedule(name, p, m, v)
    executed = tc.compare_orders(ours, {r: res[r]["order"] for r in range(p)})
    assert executed == {s: "same" for s in range(p)}
    loss, grads = ex.reference_step(model, x, y)
    got = {k: g for r in res for k, g in r["grads"].items()}
    for k, g in grads.items():
        assert_close(got[k], g, rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in res if r["loss"] is not None] == [pytest.approx(loss, rel=1e-5)]
    if name != "1f1b":  # multi-stage schedules execute their pipeline_order: same as ours
        planned = tc.compare_orders(ours, res[0]["pipeline_order"])
        assert planned == {s: "same" for s in range(p)}
