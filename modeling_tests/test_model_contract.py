"""The transformers model contract: output flags, return_dict, shift_labels, generation inputs, caches, experts.

Each option transformers defines either works as it does for native models (the test shows its effect) or raises
a clear error.
"""

from __future__ import annotations

import pytest
import torch
from tiny_configs import randomize, tiny_config
from transformers import DynamicCache

from transformers_nemotron3 import Nemotron3ForCausalLM, Nemotron3HybridCache

X = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(2))


def _model(name="all_blocks", **kw) -> Nemotron3ForCausalLM:
    model = Nemotron3ForCausalLM(tiny_config(name, **kw)).eval()
    randomize(model)
    return model


def _attention_layers(model) -> list[int]:
    return [i for i, t in enumerate(model.config.layers_block_type) if t == "full_attention"]


def test_output_attentions_and_hidden_states():
    model = _model(attn_implementation="eager")
    with torch.no_grad():
        out = model(X, output_attentions=True, output_hidden_states=True)
    n_attn = len(_attention_layers(model))
    assert len(out.attentions) == n_attn and out.attentions[0].shape == (2, 4, 10, 10)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(2, 4, 10), atol=1e-5)
    assert bool((out.attentions[0].triu(1) == 0).all())  # causal
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    with torch.no_grad():
        plain = model(X)
    assert plain.attentions is None and plain.hidden_states is None
    assert torch.equal(plain.logits, out.logits)


def test_flags_from_config_and_return_dict_false():
    model = _model()
    model.config.output_hidden_states = True
    with torch.no_grad():
        out = model(X)
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1
    model.config.output_hidden_states = False
    with torch.no_grad():
        as_tuple = model(X, return_dict=False)
        as_dict = model(X)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.logits)
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(X), tuple)


def test_router_logits_output():
    model = _model()
    with torch.no_grad():
        out = model(X, output_router_logits=True)
    n_moe = model.config.layers_block_type.count("moe")
    assert len(out.router_logits) == n_moe and out.router_logits[0].shape == (20, model.config.n_routed_experts)


def test_shift_labels_equals_labels():
    model = _model().train()
    labels = X.clone()
    labels[0, :3] = -100
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    a = model(X, labels=labels)
    b = model(X, shift_labels=shifted)
    assert torch.equal(a.loss, b.loss)
    c = model(X, shift_labels=torch.full_like(shifted, -100).masked_scatter(shifted != -100, shifted[shifted != -100]))
    assert torch.equal(a.loss, c.loss)
    other = shifted.clone()
    other[1, 4] = (other[1, 4] + 1) % 90
    assert not torch.equal(model(X, shift_labels=other).loss, a.loss)  # the targets are really read


def test_generate_from_inputs_embeds():
    model = _model()
    embeds = model.get_input_embeddings()(X[:1])
    with torch.no_grad():
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False, eos_token_id=None)
        from_ids = model.generate(X[:1], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(from_embeds, from_ids[:, X.shape[1]:])


def test_generate_outputs_attentions_and_scores():
    model = _model(attn_implementation="eager")
    with torch.no_grad():
        out = model.generate(X[:1], max_new_tokens=3, do_sample=False, eos_token_id=None,
                             output_attentions=True, output_hidden_states=True, output_scores=True,
                             return_dict_in_generate=True)
    assert len(out.attentions) == 3 and len(out.attentions[0]) == len(_attention_layers(model))
    assert out.attentions[1][0].shape[-1] == X.shape[1] + 1  # the second step attends to prompt + 1
    assert len(out.scores) == 3 and len(out.hidden_states) == 3


def _greedy(model, x, n=8, **kw):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)


def test_assisted_decoding_and_prompt_lookup_equal_greedy():
    model = _model()
    x = torch.cat([X[:1], X[:1, :5]], dim=1)  # repeated n-grams for prompt lookup
    ref = _greedy(model, x)
    assistant = _model("all_blocks")
    randomize(assistant, seed=7)
    assert torch.equal(_greedy(model, x, assistant_model=assistant), ref)
    assert torch.equal(_greedy(model, x, assistant_model=model), ref)  # all drafts accepted
    assert torch.equal(_greedy(model, x, prompt_lookup_num_tokens=3), ref)


def test_user_passed_caches():
    model = _model()
    ref = _greedy(model, X)
    assert torch.equal(_greedy(model, X, cache=DynamicCache(config=model.config)), ref)
    assert torch.equal(_greedy(model, X, cache=DynamicCache()), ref)
    assert torch.equal(_greedy(model, X, cache=Nemotron3HybridCache(model.config, 2)), ref)
    with pytest.raises(ValueError, match="cache_implementation"):
        _greedy(model, X, cache_implementation="static")


def test_cache_crop_and_beams():
    model = _model()
    cache = Nemotron3HybridCache(model.config, 1)
    with torch.no_grad():
        model(X[:1, :6], cache=cache, use_cache=True)
        cache.activate_past_recording()
        full = model(X[:1, 6:], cache=cache, use_cache=True).logits
        cache.crop(-2)
        assert cache.get_seq_length() == 8
        again = model(X[:1, 8:], cache=cache, use_cache=True).logits
    assert torch.allclose(again, full[:, 2:], atol=1e-5)
    beams = _greedy(model, X[:1], num_beams=3)
    assert beams.shape == (1, X.shape[1] + 8)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_experts_implementations_match_eager(impl):
    model = _model("latent_groups_mtp")
    with torch.no_grad():
        ref = model(X).logits
    model.set_experts_implementation(impl)
    assert model.config._experts_implementation == impl
    with torch.no_grad():
        got = model(X).logits
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_gated_experts_refuse_other_implementations():
    model = _model("all_blocks", moe_gated_experts=True)
    with pytest.raises(ValueError, match="eager"):
        model.set_experts_implementation("grouped_mm")
    model.config._experts_implementation = "grouped_mm"  # set behind transformers' back: still refused
    with pytest.raises(ValueError, match="eager"):
        model(X)


def test_peft_lora_on_routed_experts(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    _model().save_pretrained(tmp_path / "base")
    model = Nemotron3ForCausalLM.from_pretrained(tmp_path / "base").train()
    config = peft.LoraConfig(r=4, target_modules=[], target_parameters=["mixer.experts.up_proj",
                                                                       "mixer.experts.down_proj"])
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    before = lora(X, labels=X).loss.item()
    for _ in range(3):
        loss = lora(X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert lora(X, labels=X).loss.item() < before
    lora.eval()
    with torch.no_grad():
        expected = lora(X).logits
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(
        tmp_path / "adapter", import_allowlist=["transformers_nemotron3.modeling.modeling_nemotron3"]).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(X).logits, expected, atol=1e-5)


def test_name_or_path_is_set_by_from_pretrained(tmp_path):
    _model().save_pretrained(tmp_path / "m")
    loaded = Nemotron3ForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.name_or_path == str(tmp_path / "m")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_matches_eager(dtype):
    model = _model().to(dtype)
    with torch.no_grad():
        ref = model(X, use_cache=False).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
        got = compiled(X, use_cache=False).logits
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, ref, atol=tol, rtol=tol), (got - ref).abs().max()
