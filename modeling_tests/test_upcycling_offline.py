"""Offline `nemotron3 upcycle`: bit-for-bit equal to the in-memory result, loads, fails cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_configs import tiny_config
from transformers import MistralConfig, MistralForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.upcycling import UpcyclingConfig, upcycle, upcycle_to_disk
from transformers_nemotron3.upcycling.cli import main

DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("src") / "llama"
    LlamaForCausalLM(LlamaConfig(**DIMS)).save_pretrained(folder)
    return folder


def _assert_same_bits(a: Nemotron3ForCausalLM, b: Nemotron3ForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_cli_equals_online_bit_for_bit(dense_dir, tmp_path):
    out = tmp_path / "moe"
    argv = [str(dense_dir), str(out), "--experts", "4", "--granularity", "2", "--top-k", "2",
            "--max-shard-size", "60KB", "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in index["weight_map"]  # official per-expert keys
    offline = Nemotron3ForCausalLM.from_pretrained(out)
    online = upcycle(dense_dir, UpcyclingConfig(num_experts=4, granularity=2, top_k=2, seed=3))
    _assert_same_bits(online, offline)
    ids = torch.randint(3, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(online(ids).logits, offline(ids).logits)
    assert _leftovers(tmp_path) == []


def test_streaming_from_model_object_with_noise_and_nemotron_h(tmp_path):
    torch.manual_seed(0)
    dense = Nemotron3ForCausalLM(tiny_config("dense")).eval()
    cfg = UpcyclingConfig(num_experts=2, granularity=2, top_k=2, expert_noise=0.01, shared_expert=True)
    upcycle_to_disk(dense, tmp_path / "moe", cfg, progress=False)
    _assert_same_bits(upcycle(dense, cfg), Nemotron3ForCausalLM.from_pretrained(tmp_path / "moe"))


def test_bf16_source_keeps_dtype_and_fp32_router(tmp_path):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**DIMS)).to(torch.bfloat16)
    cfg = UpcyclingConfig(num_experts=4, granularity=2, top_k=2)  # f = 2: scaled in fp32, cast back
    upcycle_to_disk(dense, tmp_path / "moe", cfg, progress=False)
    offline = Nemotron3ForCausalLM.from_pretrained(tmp_path / "moe")
    online = upcycle(dense, cfg)
    _assert_same_bits(online, offline)
    assert online.backbone.layers[1].mixer.experts.up_proj.dtype == torch.bfloat16
    assert online.backbone.layers[1].mixer.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("argv_extra, message", [
    (["--experts", "2", "--top-k", "3"], "top_k=3 exceeds the 2 routed experts"),
    (["--granularity", "5", "--top-k", "5"], "granularity=5 does not divide the dense FFN width"),
    (["--granularity", "2", "--top-k", "3"], "not a multiple of granularity"),
    (["--moe-layers", "every:2"], "needs moe_layers='all'"),
])
def test_bad_options_leave_nothing(dense_dir, tmp_path, capsys, argv_extra, message):
    out = tmp_path / "moe"
    assert main([str(dense_dir), str(out), "--no-progress", *argv_extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_existing_destination_is_refused(dense_dir, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        upcycle_to_disk(dense_dir, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _leftovers(tmp_path) == []


def test_unknown_and_unmappable_architectures(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="cannot upcycle model_type='gpt2'"):
        upcycle(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        upcycle_to_disk(tmp_path / "gpt2", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    scaled = LlamaForCausalLM(LlamaConfig(**DIMS, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                                   "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                                                   "original_max_position_embeddings": 32}))
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        upcycle(scaled)
    with pytest.raises(ValueError, match="not a directory"):
        upcycle(tmp_path / "missing")
    windowed = MistralForCausalLM(MistralConfig(**DIMS, sliding_window=16))
    with pytest.raises(ValueError, match="sliding-window attention"):
        upcycle(windowed)
    with pytest.raises(ValueError, match="names MLP layer 9"):
        upcycle(Nemotron3ForCausalLM(tiny_config("dense")), moe_layers=[0, 9])


def test_interrupted_run_leaves_nothing(dense_dir, tmp_path, monkeypatch):
    import transformers_nemotron3.upcycling.stream as stream

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stream, "_write_config", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        upcycle_to_disk(dense_dir, tmp_path / "moe", progress=False)
    assert not (tmp_path / "moe").exists() and _leftovers(tmp_path) == []


def test_config_validation_messages():
    with pytest.raises(ValueError, match="router='nope'"):
        UpcyclingConfig(router="nope")
    with pytest.raises(ValueError, match="shared_expert_fraction"):
        UpcyclingConfig(shared_expert=True, shared_expert_fraction=1.0)
    with pytest.raises(ValueError, match="top_k=1 gives the router no gradient"):
        UpcyclingConfig(router="topk_softmax", top_k=1)


def test_nemotron3_command_and_nemotron_h_directory(tmp_path):
    """`nemotron3 upcycle` through the package CLI router, on a dense Nemotron-H checkpoint directory."""
    from transformers_nemotron3.cli import main as nemotron3

    torch.manual_seed(0)
    Nemotron3ForCausalLM(tiny_config("dense", initializer_range=0.1)).save_pretrained(tmp_path / "dense")
    argv = ["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "4", "--top-k", "2",
            "--moe-layers", "0,2", "--no-progress"]
    assert nemotron3(argv) == 0
    offline = Nemotron3ForCausalLM.from_pretrained(tmp_path / "moe")
    assert offline.config.hybrid_override_pattern == "MEM*-ME"
    dense = Nemotron3ForCausalLM.from_pretrained(tmp_path / "dense")
    _assert_same_bits(upcycle(dense, UpcyclingConfig(num_experts=4, top_k=2, moe_layers=[0, 2])), offline)
    ids = torch.randint(3, 96, (2, 10))
    with torch.no_grad():
        assert (offline(ids).logits - dense(ids).logits).abs().max().item() <= 1e-4
