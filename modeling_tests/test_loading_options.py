"""transformers' standard loading / saving options work on Nemotron 3 as on native models, or raise clearly.

Loading and saving are transformers' own (`from_pretrained` / `save_pretrained` with a checkpoint conversion
mapping for the official layout), so each option is transformers' behaviour; these tests show its effect on our
checkpoints.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from tiny_configs import randomize, tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM, Nemotron3Model


def _saved(tmp_path, name="latent_groups_mtp", **save_kw):
    model = Nemotron3ForCausalLM(tiny_config(name)).eval()
    randomize(model)
    folder = tmp_path / "ck"
    model.save_pretrained(folder, **save_kw)
    return model, folder


def _keys(folder) -> set[str]:
    out = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out |= set(f.keys())
    return out


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


X = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(1))


def test_official_layout_on_disk_and_exact_reload(tmp_path):
    model, folder = _saved(tmp_path)
    keys = _keys(folder)
    assert "backbone.embeddings.weight" in keys and "lm_head.weight" in keys
    assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in keys  # one tensor per expert
    assert any(k.startswith("mtp.layers.1.mixer.experts.0.") for k in keys)
    assert not any(k.startswith("model.") for k in keys)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["hybrid_override_pattern"] == "ME*E"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    back, info = Nemotron3ForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(_logits(back, X), _logits(model, X))


def test_missing_weights_are_initialised_and_reported(tmp_path):
    model, folder = _saved(tmp_path)
    bigger, info = Nemotron3ForCausalLM.from_pretrained(folder, hybrid_override_pattern="ME*EM",
                                                        output_loading_info=True)
    assert any(k.startswith("model.layers.4.") for k in info["missing_keys"])
    assert torch.isfinite(bigger.model.layers[4].mixer.in_proj.weight).all()
    assert bigger.model.layers[4].mixer.in_proj.weight.std() > 0  # initialised, not left empty


def test_ignore_mismatched_sizes(tmp_path):
    model, folder = _saved(tmp_path, "all_blocks")
    with pytest.raises(Exception, match="(?i)size|shape"):
        Nemotron3ForCausalLM.from_pretrained(folder, vocab_size=128)
    resized, info = Nemotron3ForCausalLM.from_pretrained(folder, vocab_size=128, ignore_mismatched_sizes=True,
                                                         output_loading_info=True)
    assert resized.lm_head.weight.shape[0] == 128
    assert any("lm_head" in str(k) for k in info["mismatched_keys"])


def test_subfolder_and_variant(tmp_path):
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    randomize(model)
    model.save_pretrained(tmp_path / "repo" / "inner", variant="v2")
    assert "model.v2.safetensors" in os.listdir(tmp_path / "repo" / "inner")
    other = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()  # a different model at the top level
    randomize(other, seed=5)
    other.save_pretrained(tmp_path / "repo")
    loaded = Nemotron3ForCausalLM.from_pretrained(tmp_path / "repo", subfolder="inner", variant="v2")
    assert torch.equal(_logits(loaded, X), _logits(model, X))
    with pytest.raises(OSError):
        Nemotron3ForCausalLM.from_pretrained(tmp_path / "repo", subfolder="inner")  # no plain weights there


def test_state_dict_without_a_folder_and_base_head_crossing(tmp_path):
    model, folder = _saved(tmp_path)
    rebuilt = Nemotron3ForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert torch.equal(_logits(rebuilt, X), _logits(model, X))
    # a causal-LM checkpoint into the base model, and a base checkpoint into the causal LM
    base = Nemotron3Model.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(base(X).last_hidden_state, model.model(X).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    assert "backbone.embeddings.weight" not in _keys(tmp_path / "base")  # a base model has no prefix
    head, info = Nemotron3ForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]
    assert torch.equal(head.model.layers[1].mixer.experts.up_proj, model.model.layers[1].mixer.experts.up_proj)


def test_tie_word_embeddings(tmp_path):
    tied = Nemotron3ForCausalLM(tiny_config("all_blocks", tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.model.embeddings.weight.data_ptr()
    untied = Nemotron3ForCausalLM(tiny_config("all_blocks"))
    assert untied.lm_head.weight.data_ptr() != untied.model.embeddings.weight.data_ptr()


def test_device_map_and_dtype_options(tmp_path):
    model, folder = _saved(tmp_path, "all_blocks")
    for device_map in ("cpu", "auto", {"": "cpu"}):
        loaded = Nemotron3ForCausalLM.from_pretrained(folder, device_map=device_map)
        assert torch.equal(_logits(loaded, X), _logits(model, X)), device_map
    bf16 = Nemotron3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[2].mixer.gate.weight.dtype == torch.float32  # the router stays fp32


def test_disk_offload_matches(tmp_path):
    model, folder = _saved(tmp_path, "all_blocks")
    device_map = {"model.embeddings": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "disk", "model.layers.4": "cpu",
                  "model.layers.5": "cpu", "model.norm_f": "cpu", "lm_head": "cpu"}
    offloaded = Nemotron3ForCausalLM.from_pretrained(folder, device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    assert offloaded.hf_device_map["model.layers.1"] == "disk"
    assert offloaded.model.layers[1].mixer.q_proj.weight.device.type == "meta"  # not in memory
    assert torch.allclose(_logits(offloaded, X), _logits(model, X), atol=1e-5)


def test_parallel_plans_match_native():
    from transformers import NemotronHForCausalLM

    from tiny_configs import native_config

    ours = Nemotron3ForCausalLM(tiny_config("all_blocks"))
    native = NemotronHForCausalLM(native_config(tiny_config("all_blocks")))
    assert ours._ep_plan == native._ep_plan and ours._ep_plan
    # transformers 5.25's native plan (attention projections and the embedding sharded; 5.24 sharded the experts
    # instead), plus the LM head, gathered, so a tied head shards with the embeddings
    expected = {"model.embeddings": "embedding_rowwise", "model.layers.*.mixer.q_proj": "colwise",
                "model.layers.*.mixer.k_proj": "colwise", "model.layers.*.mixer.v_proj": "colwise",
                "model.layers.*.mixer.o_proj": "rowwise", "lm_head": "colwise_gather_output"}
    assert ours._tp_plan == expected
    if "model.layers.*.mixer.q_proj" in native._tp_plan:
        assert ours._tp_plan == {**native._tp_plan, "lm_head": "colwise_gather_output"}


def test_push_to_hub_without_the_package_uploads_the_saved_folder(tmp_path, monkeypatch):
    import huggingface_hub

    from transformers_nemotron3 import Nemotron3PreTrainedModel

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private)
            return type("Repo", (), {"repo_id": f"someone/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, commit_message=None, **kw):
            calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), commit_message)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(Nemotron3PreTrainedModel, "hub_uploader", None)  # as in the saved remote code
    model = Nemotron3ForCausalLM(tiny_config("all_blocks"))
    model.save_pretrained(tmp_path / "my-model", push_to_hub=True, private=True, token="t0k")
    assert calls["create"] == ("my-model", True) and calls["token"] == "t0k"
    repo, files, _ = calls["upload"]
    assert repo == "someone/my-model" and "model.safetensors" in files and "modeling_nemotron3.py" in files


def test_push_to_hub_goes_through_publish_to_a_stand_in_hub(tmp_path, monkeypatch):
    from fake_hub import TOKEN, FakeHub
    from huggingface_hub import constants

    hub = FakeHub()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        model = Nemotron3ForCausalLM(tiny_config("all_blocks"))
        model.save_pretrained(tmp_path / "tiny", push_to_hub=True, repo_id="someone/tiny", token=TOKEN)
        uploaded = hub.repos["someone/tiny"]["files"]
        assert "README.md" in uploaded and "model.safetensors" in uploaded  # the model card came with it
    finally:
        hub.close()


def test_quantization_config_torchao(tmp_path):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    model, folder = _saved(tmp_path, "all_blocks")
    q = Nemotron3ForCausalLM.from_pretrained(folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    weight = q.model.layers[1].mixer.q_proj.weight
    assert "Int8" in type(weight).__name__, type(weight)
    inner, _ = weight.__tensor_flatten__()  # the int8 data and its scales: about a quarter of the fp32 bytes
    stored = sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in inner)
    plain = model.model.layers[1].mixer.q_proj.weight
    assert stored < 0.4 * plain.numel() * plain.element_size()
    assert not torch.equal(weight.dequantize(), plain) and torch.allclose(weight.dequantize(), plain, atol=0.02)
    assert torch.allclose(_logits(q, X), _logits(model, X), atol=0.05)


def test_quantization_config_bitsandbytes_8bit(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    model, folder = _saved(tmp_path, "all_blocks")
    q = Nemotron3ForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert type(q.model.layers[1].mixer.q_proj).__name__ == "Linear8bitLt"
    assert type(q.model.layers[0].mixer.in_proj).__name__ == "Linear8bitLt"
    assert q.get_memory_footprint() < 0.8 * model.get_memory_footprint()
    with torch.no_grad():
        assert torch.allclose(_logits(q, X), _logits(model, X), atol=0.05)


def test_prequantized_checkpoint_is_loaded_by_transformers_or_refused(tmp_path):
    model, folder = _saved(tmp_path, "all_blocks")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        loaded = Nemotron3ForCausalLM.from_pretrained(folder)
    except (ValueError, RuntimeError, ImportError) as exc:  # transformers' own refusal, naming the method
        assert "fp8" in str(exc).lower() or "gpu" in str(exc).lower() or "cuda" in str(exc).lower(), exc
        return
    # transformers' way on a machine without GPU: the FP8 quantizer dequantizes while loading and drops the
    # quantization_config; either way transformers (not a silent default) handled it
    quantized = getattr(loaded, "hf_quantizer", None) is not None
    assert quantized or getattr(loaded.config, "quantization_config", None) is None
    assert torch.allclose(_logits(loaded, X).float(), _logits(model, X), atol=0.1)
