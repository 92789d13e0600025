"""shardlab.comm's log: what each collective records, on 2 mock devices (or 2 GPUs)."""

from __future__ import annotations

import pytest

from shardlab import cost


def _logged_collectives():
    """Every collective of comm once, inside comm.record(); returns what the log says."""
    import torch

    import shardlab
    from shardlab import comm

    r, dev = shardlab.rank(), shardlab.device()
    x = torch.ones(8, 4, device=dev) * (r + 1)
    before = comm.completed_count()
    with comm.record() as log:
        assert comm.in_flight() is None
        summed = comm.all_reduce(x.clone())
        gathered = comm.all_gather(x, dim=1)
        scattered = comm.reduce_scatter(x)
        moved = comm.all_to_all(x, [2, 6] if r == 0 else [4, 4])  # uneven: counts exchanged
        if r == 0:
            comm.send(x, 1)
        else:
            comm.recv(torch.empty_like(x), 0)
        comm.broadcast(x.clone(), src=0)
        assert comm.in_flight() is None
    return {
        "records": [(rec.index - before, rec.op, rec.group, rec.group_size, rec.nbytes,
                     rec.sent_bytes, rec.shape, rec.dtype) for rec in log],
        "summary": comm.summary(log),
        "completed": comm.completed_count() - before,
        "values": (summed[0, 0].item(), tuple(gathered.shape), tuple(scattered.shape),
                   tuple(moved.shape)),
    }


def test_every_collective_is_logged_with_its_bytes(clusters):
    out = clusters(2).run(_logged_collectives)
    whole = 8 * 4 * 4  # the 8 x 4 float32 tensor, in bytes
    for r, got in enumerate(out):
        recs = got["records"]
        assert [rec[1] for rec in recs] == ["all_reduce", "all_gather", "reduce_scatter",
                                            "all_to_all", "all_to_all",
                                            "send" if r == 0 else "recv", "broadcast"]
        assert [rec[0] for rec in recs] == list(range(1, 8)), "indices count calls from 1"
        assert got["completed"] == 7
        assert all(rec[2] == "world" and rec[3] == 2 for rec in recs)
        assert [rec[7] for rec in recs] == ["float32"] * 3 + ["int64"] + ["float32"] * 3
        ar, ag, rs, counts, a2a, p2p, bc = recs
        assert ar[4:6] == (whole, cost.bytes_sent("allreduce", whole, 2))
        assert ag[4:6] == (2 * whole, cost.bytes_sent("allgather", 2 * whole, 2))
        assert rs[4:6] == (whole, cost.bytes_sent("reduce_scatter", whole, 2))
        assert counts[4] == 2 * 8  # two int64 counts
        row = 4 * 4
        assert a2a[4:6] == (whole, (6 if r == 0 else 4) * row)  # the rows meant for the peer
        assert p2p[4:6] == ((whole, whole) if r == 0 else (whole, 0))
        assert bc[4:6] == ((whole, whole) if r == 0 else (whole, 0))
        assert got["summary"]["all_to_all"]["calls"] == 2
        assert got["values"][:3] == (3.0, (8, 8), (4, 4))
    assert out[0]["values"][3] == (6, 4) and out[1]["values"][3] == (10, 4)


def _equal_all_to_all_and_out_buffers():
    import torch

    import shardlab
    from shardlab import comm

    r, dev = shardlab.rank(), shardlab.device()
    x = torch.arange(8.0, device=dev).view(4, 2) + 100 * r
    with comm.record() as log:
        moved = comm.all_to_all(x)  # equal splits: no count exchange
        buf = torch.full((8, 2), float("nan"), device=dev)
        gathered = comm.all_gather(x, out=buf)
        part = torch.empty(2, 2, device=dev)
        scattered = comm.reduce_scatter(x, out=part)
    try:
        comm.all_gather(x, out=torch.empty(3, 2, device=dev))
        bad = None
    except ValueError as e:
        bad = str(e)
    return {"ops": [rec.op for rec in log], "moved": moved.cpu(), "same_buffers":
            (gathered.data_ptr() == buf.data_ptr(), scattered.data_ptr() == part.data_ptr()),
            "gathered": gathered.cpu(), "scattered": scattered.cpu(), "bad": bad}


def test_equal_all_to_all_skips_the_count_exchange_and_out_buffers_are_filled(clusters):
    import torch

    out = clusters(2).run(_equal_all_to_all_and_out_buffers)
    x = [torch.arange(8.0).view(4, 2) + 100 * r for r in range(2)]
    for r, got in enumerate(out):
        assert got["ops"] == ["all_to_all", "all_gather", "reduce_scatter"]
        assert torch.equal(got["moved"], torch.cat([x[0].chunk(2)[r], x[1].chunk(2)[r]]))
        assert got["same_buffers"] == (True, True)
        assert torch.equal(got["gathered"], torch.cat(x))
        assert torch.equal(got["scattered"], (x[0] + x[1]).chunk(2)[r])
        assert "out must be a contiguous torch.float32 tensor of shape (8, 2)" in got["bad"]


def test_bytes_sent_matches_the_ring_factors():
    assert cost.bytes_sent("allreduce", 1000, 4) == cost.allreduce_bytes(1000, 4) == 1500
    assert cost.bytes_sent("p2p", 1000, 2) == 1000
    with pytest.raises(ValueError, match="unknown collective"):
        cost.bytes_sent("all_reduce", 1000, 2)
