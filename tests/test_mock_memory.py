"""Mock devices with a memory capacity: exact counting, clear errors, a model that fits only
when split across ranks."""

from __future__ import annotations

import pickle

import pytest
import torch

from shardlab import memory
from shardlab.memory import ModelSpec
from shardlab.mock_memory import (
    MockMemory,
    MockOutOfMemory,
    format_bytes,
    stage_layers,
    stage_modules,
    staged_forward,
)
from shardlab.models import TinyTransformer, make_batch

SPEC = ModelSpec("mini", layers=4, hidden=64, heads=4, kv_heads=1, ffn=224, vocab=256)


def test_counts_exactly_the_bytes_of_new_tensors():
    mem = MockMemory(10**6)
    with mem:
        layer = torch.nn.Linear(100, 50)  # initialised in place: no temporaries
    assert mem.live_bytes() == (100 * 50 + 50) * 4
    with mem:
        x = torch.zeros(10, 100)
        view = x[:5]  # a view shares its storage: not counted again
        y = layer(view)
    assert mem.live_bytes() == (100 * 50 + 50 + 10 * 100 + 5 * 50) * 4
    assert mem.allocations == 4


def test_freed_tensors_are_given_back_and_peak_remembers():
    mem = MockMemory(10**6)
    with mem:
        a = torch.ones(1000)
        b = torch.ones(2000)
    assert mem.live_bytes() == 12000
    del b
    assert mem.live_bytes() == 4000
    assert mem.peak == 12000
    assert mem.free == 10**6 - 4000
    del a


def test_out_of_memory_names_device_op_request_and_capacity():
    mem = MockMemory(4096, device_name="mock-gpu:7")
    with mem:
        keep = torch.zeros(512)  # 2 KiB
        with pytest.raises(MockOutOfMemory) as info:
            torch.zeros(1024)  # 4 KiB more: over
    e = info.value
    assert (e.device, e.requested, e.in_use, e.capacity) == ("mock-gpu:7", 4096, 2048, 4096)
    assert "aten.zeros" in e.op or "aten.empty" in e.op or "aten.zero" in e.op
    msg = str(e)
    assert "mock-gpu:7 is out of memory" in msg and "4.00 KiB" in msg and "2.00 KiB" in msg
    assert isinstance(e, MemoryError)
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == msg
    assert mem.live_bytes() == 2048  # the failed request holds nothing
    del keep


def test_training_state_is_counted_gradients_and_optimizer():
    model = TinyTransformer.from_spec(SPEC, device="meta")
    mem = MockMemory(10**8)
    with mem:
        model = TinyTransformer.from_spec(SPEC)
        weights = mem.live_bytes()
        opt = torch.optim.Adam(model.parameters())
        loss = model(make_batch(0, 2, 8, SPEC.vocab)[0]).sum()
        loss.backward()
        opt.step()
    del loss
    params = memory.parameter_count(SPEC) * 4
    assert weights == params
    # weights + gradients + Adam's two moments (+ its scalar step counters)
    assert 4 * params <= mem.live_bytes() <= 4 * params + 4096
    assert mem.peak > 2 * params  # activations were alive during backward


def test_meta_tensors_cost_nothing_and_track_counts_outside_tensors():
    mem = MockMemory(1000)
    with mem:
        TinyTransformer.from_spec(SPEC, device="meta")
    assert mem.live_bytes() == 0
    outside = torch.zeros(100)
    mem.track(outside)
    assert mem.live_bytes() == 400
    with pytest.raises(MockOutOfMemory):
        mem.track(torch.nn.Linear(20, 20))


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        MockMemory(0)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(2048) == "2.00 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


@pytest.mark.parametrize("layers,stages", [(8, 4), (10, 4), (4, 4), (5, 2), (3, 1)])
def test_stages_partition_the_layers(layers, stages):
    ranges = [stage_layers(layers, s, stages) for s in range(stages)]
    assert [i for r in ranges for i in r] == list(range(layers))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    names = [n for s in range(stages) for n in stage_modules(layers, s, stages)]
    assert names[0] == "embed_tokens" and names[-2:] == ["norm", "lm_head"]
    with pytest.raises(ValueError):
        stage_layers(layers, stages, stages)
    with pytest.raises(ValueError):
        stage_layers(layers, 0, layers + 1)


def _capacity() -> int:
    # like a 70B model on an 80 GB card: the card holds 80/141 of the weights
    return int(memory.weight_bytes(SPEC, "bf16") * 80e9 / memory.weight_bytes("llama3-70b"))


def test_too_big_for_one_mock_device_fits_when_split_over_four(clusters):
    world = 4
    cap = _capacity()
    tokens, _ = make_batch(0, batch=2, seq_len=16, vocab=SPEC.vocab)
    whole = clusters(world).run(staged_forward, SPEC, cap, tokens, split=False,
                                dtype=torch.bfloat16)
    for r, res in enumerate(whole):
        assert not res["fits"]
        assert f"mock-gpu:{r} is out of memory" in res["error"]
        assert res["peak_bytes"] <= cap
    split = clusters(world).run(staged_forward, SPEC, cap, tokens, split=True,
                                dtype=torch.bfloat16)
    assert all(res["fits"] and res["error"] is None for res in split)
    assert all(res["peak_bytes"] <= cap for res in split)
    assert [i for res in split for i in res["layers"]] == list(range(SPEC.layers))
    assert sum(res["weight_bytes"] for res in split) == memory.weight_bytes(SPEC, "bf16")
    reference = TinyTransformer.from_spec(SPEC, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference(tokens)
    torch.testing.assert_close(split[-1]["logits"], expected)
    assert all(res["logits"] is None for res in split[:-1])


def test_split_reports_a_stage_that_does_not_fit(clusters):
    tokens, _ = make_batch(0, batch=2, seq_len=16, vocab=SPEC.vocab)
    tiny_cap = memory.weight_bytes(SPEC, "bf16") // 8  # not even a quarter of the weights
    res = clusters(4).run(staged_forward, SPEC, tiny_cap, tokens, split=True,
                          dtype=torch.bfloat16)
    assert not any(r["fits"] for r in res)  # every stage is over budget here
    assert all(r["logits"] is None for r in res)
