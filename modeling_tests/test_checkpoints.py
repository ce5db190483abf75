"""Official on-disk format in and out: hand-written checkpoints, native layout, bit-exact round trips, bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from official_checkpoint import TINY_OFFICIAL, write_official_checkpoint
from safetensors import safe_open
from transformers import NemotronHForCausalLM

from transformers_nemotron3 import Nemotron3ForCausalLM


def read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_hand_written_official_checkpoint_loads_like_native(tmp_path):
    written = write_official_checkpoint(tmp_path / "official", TINY_OFFICIAL, shards=3)
    ours = Nemotron3ForCausalLM.from_pretrained(tmp_path / "official")
    assert ours.mtp is not None and ours.config.moe_latent_size == 12
    native = NemotronHForCausalLM.from_pretrained(tmp_path / "official", dtype=torch.float32).eval()
    x = torch.randint(3, 80, (2, 13))
    with torch.no_grad():
        diff = (ours(x).logits - native(x).logits).abs().max().item()
    assert diff <= 1e-4, diff
    # every written tensor landed in our model unchanged (experts stacked, MTP included)
    sd = ours.state_dict()
    assert torch.equal(sd["mtp.layers.0.eh_proj.weight"], written["mtp.layers.0.eh_proj.weight"])
    assert torch.equal(sd["model.layers.1.mixer.experts.up_proj"][3],
                       written["backbone.layers.1.mixer.experts.3.up_proj.weight"])


def test_save_round_trip_is_byte_exact(tmp_path):
    written = write_official_checkpoint(tmp_path / "official", TINY_OFFICIAL, shards=2)
    model = Nemotron3ForCausalLM.from_pretrained(tmp_path / "official")
    model.save_pretrained(tmp_path / "saved", max_shard_size="30KB")
    files = os.listdir(tmp_path / "saved")
    assert "model.safetensors.index.json" in files and "modeling_nemotron3.py" in files
    saved = read_all(tmp_path / "saved")
    assert set(saved) == set(written)
    for key, value in written.items():
        assert saved[key].dtype == value.dtype and torch.equal(saved[key], value), key
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["hybrid_override_pattern"] == "MEM*E-"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nemotron3.Nemotron3ForCausalLM"
    again = Nemotron3ForCausalLM.from_pretrained(tmp_path / "saved")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_bf16_round_trip_keeps_dtypes(tmp_path):
    write_official_checkpoint(tmp_path / "official", TINY_OFFICIAL)
    model = Nemotron3ForCausalLM.from_pretrained(tmp_path / "official", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.backbone.layers[1].mixer.gate.weight.dtype == torch.float32  # router stays fp32
    model.save_pretrained(tmp_path / "bf16")
    back = Nemotron3ForCausalLM.from_pretrained(tmp_path / "bf16")
    assert back.lm_head.weight.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_native_layout_loads(tmp_path):
    cfg = dict(TINY_OFFICIAL, num_nextn_predict_layers=0)
    write_official_checkpoint(tmp_path / "official", cfg)
    native = NemotronHForCausalLM.from_pretrained(tmp_path / "official", dtype=torch.float32).eval()
    native.save_pretrained(tmp_path / "native", save_original_format=False)  # model.*, fused experts
    keys = read_all(tmp_path / "native")
    assert any(k.startswith("model.layers.1.mixer.experts.up_proj") for k in keys)
    ours = Nemotron3ForCausalLM.from_pretrained(tmp_path / "native")
    x = torch.randint(3, 80, (1, 9))
    with torch.no_grad():
        assert (ours(x).logits - native(x).logits).abs().max() <= 1e-4
    # and our writer produces that layout too
    ours.save_pretrained(tmp_path / "ours_native", save_original_format=False)
    assert set(read_all(tmp_path / "ours_native")) == set(keys)


def test_truncated_file_gives_clear_error(tmp_path):
    write_official_checkpoint(tmp_path / "ck", TINY_OFFICIAL, shards=2)
    shard = tmp_path / "ck" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)incomplete|header|deserializ"):  # safetensors' own error
        Nemotron3ForCausalLM.from_pretrained(tmp_path / "ck")


def test_missing_shard_mismatched_config_and_missing_layers(tmp_path):
    write_official_checkpoint(tmp_path / "ck", TINY_OFFICIAL, shards=2)
    (tmp_path / "ck" / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(OSError, match="model-00001-of-00002.safetensors"):
        Nemotron3ForCausalLM.from_pretrained(tmp_path / "ck")
    write_official_checkpoint(tmp_path / "ck2", TINY_OFFICIAL)
    # one layer more than the weights: initialised and reported, as transformers does for any model
    model, info = Nemotron3ForCausalLM.from_pretrained(tmp_path / "ck2", hybrid_override_pattern="MEM*E-M",
                                                       output_loading_info=True)
    assert any(k.startswith("model.layers.6.") for k in info["missing_keys"])
    cfg = json.loads((tmp_path / "ck2" / "config.json").read_text())
    cfg["moe_intermediate_size"] = 17
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        Nemotron3ForCausalLM.from_pretrained(tmp_path / "ck2")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    write_official_checkpoint(tmp_path / "ck", TINY_OFFICIAL)
    model = Nemotron3ForCausalLM.from_pretrained(tmp_path / "ck")
    model.save_pretrained(tmp_path / "out")
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    import transformers_nemotron3.modeling.modeling_nemotron3 as modeling

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(modeling, "_move_into", boom)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "out")
    after = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    assert after == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary folder left behind


def test_fewer_shards_on_resave_removes_the_stale_ones(tmp_path):
    write_official_checkpoint(tmp_path / "ck", TINY_OFFICIAL)
    model = Nemotron3ForCausalLM.from_pretrained(tmp_path / "ck")
    model.save_pretrained(tmp_path / "out", max_shard_size="30KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "out")
    model.save_pretrained(tmp_path / "out")
    names = os.listdir(tmp_path / "out")
    assert "model.safetensors" in names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")], names
    again = Nemotron3ForCausalLM.from_pretrained(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
