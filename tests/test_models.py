"""The course's tiny models: shapes that match shardlab.memory, deterministic partial builds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shardlab import memory
from shardlab.memory import MODELS, ModelSpec
from shardlab.models import (
    Block,
    TinyMLP,
    TinyTransformer,
    count_parameters,
    init_parameters,
    lm_loss,
    make_batch,
    make_mlp_batch,
    materialize,
    mse_loss,
    parameter_bytes,
    rope,
)

SMALL = ModelSpec("small", layers=3, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=64)


@pytest.mark.parametrize("spec", [MODELS["tiny"], SMALL,
                                  dataclasses.replace(SMALL, tied_embeddings=True),
                                  dataclasses.replace(SMALL, kv_heads=4)],
                         ids=["tiny", "small", "tied", "mha"])
def test_parameter_count_equals_the_analytic_count(spec):
    model = TinyTransformer.from_spec(spec, device="meta")
    assert count_parameters(model) == memory.parameter_count(spec)
    assert count_parameters(model) == memory.meta_parameter_count(spec)


def test_layer_names_and_structure_for_sharding():
    model = TinyTransformer.from_spec(SMALL)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 3
    block = model.blocks[0]
    assert isinstance(block, Block)
    assert (block.attn.n_heads, block.attn.n_kv_heads, block.attn.head_dim) == (4, 2, 8)
    assert block.attn.k_proj.weight.shape == (2 * 8, 32)
    assert block.mlp.gate_proj.weight.shape == (48, 32)
    assert block.mlp.down_proj.weight.shape == (32, 48)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_forward_equals_embed_blocks_head():
    model = TinyTransformer.from_spec(SMALL)
    tokens, _ = make_batch(0, batch=2, seq_len=10, vocab=SMALL.vocab)
    logits = model(tokens)
    assert logits.shape == (2, 10, SMALL.vocab)
    x = model.embed(tokens)
    for block in model.blocks:
        x = block(x)
    torch.testing.assert_close(model.head(x), logits)


def test_attention_is_causal():
    model = TinyTransformer.from_spec(SMALL)
    tokens, _ = make_batch(1, batch=1, seq_len=12, vocab=SMALL.vocab)
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % SMALL.vocab
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


def test_rope_is_a_rotation_that_leaves_position_zero_alone():
    x = torch.randn(2, 3, 7, 8)
    y = rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


def test_seeded_initialisation():
    a = TinyTransformer.from_spec(SMALL, seed=3)
    b = TinyTransformer.from_spec(SMALL, seed=3)
    c = TinyTransformer.from_spec(SMALL, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    assert torch.all(a.norm.weight == 1)
    std = a.blocks[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025


def test_materialize_builds_any_part_with_the_whole_models_values():
    whole = TinyTransformer.from_spec(SMALL, seed=7)
    part = TinyTransformer.from_spec(SMALL, seed=7, device="meta")
    assert all(p.is_meta for p in part.parameters())
    materialize(part, ["blocks.1", "lm_head"], seed=7)
    assert torch.equal(part.blocks[1].attn.q_proj.weight, whole.blocks[1].attn.q_proj.weight)
    assert torch.equal(part.lm_head.weight, whole.lm_head.weight)
    assert part.blocks[0].attn.q_proj.weight.is_meta and part.embed_tokens.weight.is_meta
    x = torch.randn(2, 5, SMALL.hidden)
    torch.testing.assert_close(part.blocks[1](x), whole.blocks[1](x))


def test_dtype_and_bytes():
    model = TinyTransformer.from_spec(SMALL, dtype=torch.bfloat16)
    assert parameter_bytes(model) == memory.weight_bytes(SMALL, "bf16")
    whole = TinyTransformer.from_spec(SMALL)
    # same values, rounded: the fp32 draw is cast
    torch.testing.assert_close(model.lm_head.weight, whole.lm_head.weight.bfloat16())


def test_tied_embeddings_share_one_matrix():
    model = TinyTransformer.from_spec(dataclasses.replace(SMALL, tied_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_make_batch_is_deterministic_and_next_token():
    tokens, targets = make_batch(5, batch=4, seq_len=9, vocab=50)
    t2, _ = make_batch(5, batch=4, seq_len=9, vocab=50)
    assert torch.equal(tokens, t2) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    assert not torch.equal(tokens, make_batch(6, batch=4, seq_len=9, vocab=50)[0])
    assert int(tokens.max()) < 50 and int(tokens.min()) >= 0


def test_the_transformer_learns():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=64, hidden=32, heads=4, layers=2, ffn=64, kv_heads=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(40):
        loss = lm_loss(model, make_batch(step, batch=16, seq_len=16, vocab=64))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


def test_tiny_mlp():
    mlp = TinyMLP((8, 32, 32, 4), seed=1)
    assert len(mlp.layers) == 3
    x, y = make_mlp_batch(0, batch=5, in_dim=8, out_dim=4)
    assert mlp(x).shape == (5, 4)
    assert mse_loss(mlp, (x, y)).dim() == 0
    assert count_parameters(mlp) == 8 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4
    # every batch shares one teacher: recover it from one batch, predict another
    x1, y1 = make_mlp_batch(1, batch=64, in_dim=8, out_dim=4)
    x2, y2 = make_mlp_batch(2, batch=64, in_dim=8, out_dim=4)
    teacher = torch.linalg.lstsq(x1, torch.atanh(y1)).solution
    torch.testing.assert_close(torch.tanh(x2 @ teacher), y2, atol=1e-4, rtol=1e-4)


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError, match="heads"):
        TinyTransformer(vocab=10, hidden=30, heads=4, layers=1, ffn=8)
    with pytest.raises(ValueError, match="kv_heads"):
        TinyTransformer(vocab=10, hidden=32, heads=4, layers=1, ffn=8, kv_heads=3)
    with pytest.raises(ValueError, match="layers"):
        TinyTransformer(vocab=10, hidden=32, heads=4, layers=0, ffn=8)
    with pytest.raises(ValueError, match="mixture"):
        TinyTransformer.from_spec("tiny-moe")
    with pytest.raises(ValueError, match="dims"):
        TinyMLP((8,))
    with pytest.raises(ValueError, match="batch"):
        make_batch(0, batch=0)


def test_init_parameters_prefix():
    whole = TinyTransformer.from_spec(SMALL, seed=2)
    block = Block(SMALL.hidden, SMALL.heads, SMALL.kv_heads, SMALL.ffn)
    init_parameters(block, seed=2, prefix="blocks.2")
    for a, b in zip(block.parameters(), whole.blocks[2].parameters()):
        assert torch.equal(a, b)
