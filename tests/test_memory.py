"""Unit tests for shardlab.memory: shapes, parameter counts, bytes."""

import sys

import pytest

from conftest import import_without_torch

from shardlab import memory
from shardlab.memory import (
    MODELS,
    ModelSpec,
    activation_bytes,
    active_parameter_count,
    dtype_bytes,
    hidden_state_bytes,
    kv_cache_bytes,
    kv_heads_per_rank,
    memory_per_gpu,
    meta_parameter_count,
    parameter_breakdown,
    parameter_count,
    training_state_bytes,
    weight_bytes,
)

# SYLLABUS.md reference table, in billions (computed there from the HF configs).
TABLE_B = {
    "llama2-70b": 68.98,
    "llama3-8b": 8.03,
    "llama3-70b": 70.55,
    "llama3-405b": 405.85,
    "mixtral-8x7b": 46.70,
}


def test_contract_keys_present():
    assert set(TABLE_B) <= set(MODELS)


@pytest.mark.parametrize("key,billions", TABLE_B.items())
def test_parameter_count_matches_syllabus_table(key, billions):
    assert abs(parameter_count(MODELS[key]) / 1e9 - billions) < 0.01


def test_parameter_count_exact_llama2_70b():
    # 80 x (attn 8192*8192*2 + 2*8192*1024 + mlp 3*8192*28672 + norms 2*8192)
    # + embedding and head 2*32000*8192 + final norm 8192
    assert parameter_count("llama2-70b") == 68_976_648_192


def test_parameter_count_accepts_key_and_spec():
    assert parameter_count("llama3-8b") == parameter_count(MODELS["llama3-8b"])


def test_reference_shapes():
    s = MODELS["llama3-405b"]
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.ffn, s.vocab) == (126, 16384, 128, 8, 53248, 128256)
    assert s.head_dim == 128
    m = MODELS["mixtral-8x7b"]
    assert (m.experts, m.top_k) == (8, 2)


def test_active_parameters_mixtral():
    assert abs(active_parameter_count("mixtral-8x7b") / 1e9 - 12.88) < 0.01
    # dense models: everything is active
    assert active_parameter_count("llama3-70b") == parameter_count("llama3-70b")


def test_breakdown_sums_to_total_and_has_components():
    for key in MODELS:
        parts = parameter_breakdown(key)
        assert sum(parts.values()) == parameter_count(key)
        assert {"embedding", "attention", "mlp", "norms", "lm_head", "router"} <= set(parts)
    assert parameter_breakdown("llama3-8b")["router"] == 0
    assert parameter_breakdown("mixtral-8x7b")["router"] == 32 * 4096 * 8


def test_tied_embeddings_drop_the_head():
    untied = MODELS["tiny"]
    tied = ModelSpec("tiny-tied", untied.layers, untied.hidden, untied.heads, untied.kv_heads,
                     untied.ffn, untied.vocab, tied_embeddings=True)
    assert parameter_count(untied) - parameter_count(tied) == untied.vocab * untied.hidden
    assert meta_parameter_count(tied) == parameter_count(tied)


@pytest.mark.parametrize("key", list(MODELS))
def test_meta_count_equals_analytic(key):
    # mixtral / 405B: build two layers and extrapolate; the small ones fully
    layers = 2 if MODELS[key].hidden > 4096 or MODELS[key].is_moe else None
    assert meta_parameter_count(key, layers=layers) == parameter_count(key)


def test_meta_count_full_build_matches_partial():
    assert meta_parameter_count("llama3-8b") == meta_parameter_count("llama3-8b", layers=1)


def test_dtype_bytes():
    assert [dtype_bytes(d) for d in ("fp32", "fp16", "bf16", "int8", "int4")] == [4, 2, 2, 1, 0.5]
    assert dtype_bytes("bfloat16") == 2
    assert dtype_bytes("torch.float32") == 4
    torch = pytest.importorskip("torch")
    assert dtype_bytes(torch.float16) == 2


def test_unknown_dtype_lists_valid_ones():
    with pytest.raises(ValueError, match="fp32.*fp16.*bf16.*int8.*int4"):
        dtype_bytes("fp8")


def test_unknown_model_lists_keys():
    with pytest.raises(ValueError, match="llama3-70b"):
        parameter_count("llama-70b")


def test_bad_spec_rejected():
    with pytest.raises(ValueError, match="divisible by heads"):
        ModelSpec("bad", layers=1, hidden=100, heads=3, kv_heads=1, ffn=10, vocab=10)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ModelSpec("bad", layers=1, hidden=64, heads=8, kv_heads=3, ffn=10, vocab=10)
    with pytest.raises(ValueError, match="top_k"):
        ModelSpec("bad", layers=1, hidden=64, heads=8, kv_heads=8, ffn=10, vocab=10, experts=2, top_k=3)


def test_weight_bytes():
    p = parameter_count("llama3-70b")
    assert weight_bytes("llama3-70b", "fp16") == 2 * p
    assert weight_bytes("llama3-70b", "int4") == p // 2
    assert 140e9 < weight_bytes("llama3-70b", "bf16") < 142e9  # "about 140 GB"


def test_kv_cache_contract_value():
    assert kv_cache_bytes(MODELS["llama3-70b"], 1, 1, "fp16") == 327_680
    assert kv_cache_bytes("llama2-70b", 1, 1, "fp16") == 327_680
    # 8k context: about 2.7 GB per sequence; linear in batch and length
    assert kv_cache_bytes("llama3-70b", 1, 8192) == 327_680 * 8192
    assert round(kv_cache_bytes("llama3-70b", 1, 8192) / 1e9, 1) == 2.7
    assert kv_cache_bytes("llama3-70b", 4, 100) == 400 * 327_680


def test_kv_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch"):
        kv_cache_bytes("llama3-70b", 0, 1)
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes("llama3-70b", 1, -5)


def test_kv_heads_per_rank_gqa():
    assert kv_heads_per_rank("llama3-70b", 4) == 2
    assert kv_heads_per_rank("llama3-70b", 8) == 1
    assert kv_heads_per_rank("llama3-70b", 16) == 1  # replicated
    with pytest.raises(ValueError, match="divide"):
        kv_heads_per_rank("llama3-70b", 3)


def test_hidden_state_128k():
    b = hidden_state_bytes(1, 128 * 1024, 8192, "fp16")
    assert b == 131072 * 8192 * 2
    assert round(b / 1e9, 1) == 2.1


def test_training_state_16_bytes_per_param():
    p = parameter_count("llama3-8b")
    assert training_state_bytes("llama3-8b") == 16 * p
    assert training_state_bytes("llama3-8b", optimizer_bytes_per_param=8) == 12 * p


def test_activation_training_korthikanti():
    spec = MODELS["llama3-70b"]
    s, b, h, a = 4096, 1, spec.hidden, spec.heads
    per_layer = s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes(spec, b, s, training=True) == pytest.approx(per_layer * spec.layers)
    # TP alone leaves 10 sbh replicated; SP divides everything by t
    t = 8
    tp_only = activation_bytes(spec, b, s, training=True, tp=t)
    tp_sp = activation_bytes(spec, b, s, training=True, tp=t, sp=True)
    assert tp_only == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * spec.layers)
    assert tp_sp == pytest.approx(per_layer * spec.layers / t)
    assert tp_sp < tp_only


def test_errata9_training_vs_inference_activations_at_128k():
    spec = MODELS["llama3-70b"]
    training = activation_bytes(spec, 1, 128 * 1024, training=True, flash_attention=True)
    inference = activation_bytes(spec, 1, 128 * 1024, training=False, flash_attention=True)
    assert training > 160e9  # every layer kept for backward
    assert inference < 160e9 / 4  # one layer's working set
    assert inference > hidden_state_bytes(1, 128 * 1024, spec.hidden)


def test_inference_activations_shrink_with_tp_and_sp():
    a1 = activation_bytes("llama3-70b", 1, 8192, tp=1)
    a4 = activation_bytes("llama3-70b", 1, 8192, tp=4)
    a4sp = activation_bytes("llama3-70b", 1, 8192, tp=4, sp=True)
    assert a1 > a4 > a4sp


def test_memory_per_gpu_70b_tp4_inference():
    r = memory_per_gpu("llama3-70b", dtype="fp16", batch=1, seq_len=8192, tp=4)
    # 35 GB of weights per GPU (drill 1), KV cache split over 4 ranks
    assert round(r.weights / 1e9) == 35
    assert r.kv_cache == kv_cache_bytes("llama3-70b", 1, 8192) // 4
    assert r.gradients == r.optimizer == 0
    assert r.total == r.weights + r.kv_cache + r.activations
    assert r.fits(80e9)
    assert not memory_per_gpu("llama3-70b", tp=1).fits(80e9)


def test_memory_per_gpu_pp_and_training_zero():
    full = memory_per_gpu("llama3-405b", tp=8, pp=1)
    split = memory_per_gpu("llama3-405b", tp=8, pp=2)
    assert split.weights < full.weights and split.weights > full.weights / 2 * 0.99
    t0 = memory_per_gpu("llama3-8b", workload="training", dp=8, zero=0)
    t1 = memory_per_gpu("llama3-8b", workload="training", dp=8, zero=1)
    t3 = memory_per_gpu("llama3-8b", workload="training", dp=8, zero=3)
    p = parameter_count("llama3-8b")
    assert t0.weights + t0.gradients + t0.optimizer == 16 * p
    assert t1.optimizer == pytest.approx(12 * p / 8, rel=1e-9)
    assert t1.gradients == t0.gradients
    assert t3.weights + t3.gradients + t3.optimizer == pytest.approx(2 * p, rel=1e-9)
    assert t0.kv_cache == 0


def test_memory_per_gpu_bad_inputs():
    with pytest.raises(ValueError, match="inference' or 'training"):
        memory_per_gpu("llama3-8b", workload="serving")
    with pytest.raises(ValueError, match="ZeRO"):
        memory_per_gpu("llama3-8b", workload="training", zero=4)
    with pytest.raises(ValueError, match="pp=200"):
        memory_per_gpu("llama3-8b", pp=200)
    with pytest.raises(ValueError, match="tp=3"):
        memory_per_gpu("llama3-8b", tp=3)


def test_module_imports_without_torch():
    # The arithmetic modules must import with only stdlib + numpy (for in-browser use).
    # A bare package object stands in for shardlab/__init__.py, which may import torch for
    # the runtime: this checks these three modules only.
    out = import_without_torch("shardlab.memory, shardlab.hardware, shardlab.cost",
                               "shardlab.memory.parameter_count('llama3-8b')")
    assert int(out) == parameter_count("llama3-8b")
