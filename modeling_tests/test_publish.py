"""`nemotron3 publish` / `publish()`: folder checks, model card, and the upload against a loopback stand-in Hub.

Nothing leaves 127.0.0.1: the upload tests point huggingface_hub at `fake_hub.FakeHub` (an http.server thread
that answers the requests `HfApi.create_repo` + `upload_folder` make), and the oracle for "the upload is a
usable checkpoint" is loading the uploaded bytes back with `from_pretrained` and comparing every tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest
import torch
from huggingface_hub import ModelCard, constants
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM, cli
from transformers_nemotron3.publish import check_folder, publish, push_model_to_hub
from transformers_nemotron3.tokenizer import build_tiny_tokenizer

from fake_hub import TOKEN, USER, FakeHub

SUMMARY = {"steps": 30, "loss": {"first": 6.25, "last": 1.5}, "dataset": "tiny|chat"}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = build_tiny_tokenizer()
    return Nemotron3ForCausalLM(tiny_config("latent_groups_mtp", vocab_size=len(tokenizer))).eval(), tokenizer


@pytest.fixture(scope="module")
def saved(model_and_tokenizer, tmp_path_factory):
    """A sharded tiny checkpoint with tokenizer, training summary and a stray pickle (which must not upload)."""
    model, tokenizer = model_and_tokenizer
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    (folder / "training_summary.json").write_text(json.dumps(SUMMARY))
    torch.save(torch.zeros(2), folder / "quickstart_prompt.pt")
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "tiny")


@pytest.fixture
def hub(monkeypatch):
    """The stand-in Hub; huggingface_hub's default endpoint points at it too, so no request leaves loopback."""
    fake = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield fake
    fake.close()


def test_dry_run_passes_and_lists_every_file(saved):
    result = publish(saved, "someone/tiny", dry_run=True)
    names = [name for name, _ in result.files]
    on_disk = set(os.listdir(saved))
    assert set(names) == (on_disk - {"quickstart_prompt.pt"}) | {"README.md"}
    assert [name for name, _ in result.report.skipped] == ["quickstart_prompt.pt"]
    sizes = dict(result.files)
    assert sizes["config.json"] == (saved / "config.json").stat().st_size
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= set(names) and len(set(index["weight_map"].values())) > 1
    assert {"modeling_nemotron3.py", "configuration_nemotron3.py", "moe.py", "tokenizer.json"} <= set(names)


def test_model_card_metadata_architecture_and_summary(saved):
    card = ModelCard(publish(saved, "someone/tiny", dry_run=True).card)  # huggingface_hub parses it back
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"nemotron3", "nemotron_h", "custom_code"} <= set(meta["tags"])
    raw = json.loads((saved / "config.json").read_text())
    assert f"`{raw['hybrid_override_pattern']}`" in card.text
    assert f"{raw['n_routed_experts']} routed, top-{raw['num_experts_per_tok']}" in card.text
    assert f"`{raw['mtp_hybrid_override_pattern']}`" in card.text
    assert 'from_pretrained("someone/tiny", trust_remote_code=True' in card.text
    assert "import transformers_nemotron3" in card.text
    assert "| loss.last | 1.5 |" in card.text and "| dataset | tiny\\|chat |" in card.text


def test_model_card_of_a_dense_model_without_mtp(tmp_path):
    from transformers_nemotron3.publish import FolderReport, build_model_card

    config = tiny_config("dense")
    text = str(build_model_card(FolderReport(folder=tmp_path, config=config), "someone/dense"))
    assert f"`{config.hybrid_override_pattern}`" in text and "| MTP | none |" in text
    assert "| experts |" not in text and "## Training summary" not in text
    assert f"({config.hybrid_override_pattern.count('M')} Mamba-2, " in text


def _drop(*names):
    def breaker(folder):
        for name in names:
            os.remove(folder / name)
    return breaker


def _rewrite_json(name, change):
    def breaker(folder):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return breaker


def _first_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[0]


def _truncate_shard(folder):
    shard = _first_shard(folder)
    shard.write_bytes(shard.read_bytes()[:-100])


def _misname_shard(index):
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "model-00099-of-00099.safetensors"


BROKEN = {
    "missing imported code file": (_drop("moe.py"), "moe.py is missing"),
    "missing auto_map module": (_drop("configuration_nemotron3.py"), "needs configuration_nemotron3.py"),
    "index names a missing shard": (_rewrite_json("model.safetensors.index.json", _misname_shard),
                                    "names shard model-00099-of-00099.safetensors"),
    "index not JSON": (lambda f: (f / "model.safetensors.index.json").write_text("{"), "index.json is unreadable"),
    "truncated shard": (_truncate_shard, "cannot be read"),
    "missing tokenizer": (_drop("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"), "no tokenizer"),
    "missing chat template": (_drop("chat_template.jinja"), "no chat template"),
    "config from another model": (_rewrite_json("config.json", lambda c: c.update(vocab_size=300)),
                                  "config.json does not belong to these weights"),
    "missing config": (_drop("config.json"), "config.json is missing"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_is_refused_naming_the_problem(copy, case):
    breaker, message = BROKEN[case]
    assert check_folder(copy).ok  # the copy is fine before it is broken
    breaker(copy)
    report = check_folder(copy)
    assert not report.ok and any(message in problem for problem in report.problems), report.problems
    with pytest.raises(ValueError, match="not ready to publish") as err:
        publish(copy, "someone/tiny", dry_run=True)
    assert message in str(err.value)


def test_cli_dry_run_and_refusal(saved, copy, capsys):
    assert cli.main(["publish", str(saved), "someone/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "README.md" in out and "skip quickstart_prompt.pt" in out
    os.remove(copy / "mamba2.py")
    assert cli.main(["publish", str(copy), "someone/tiny", "--dry-run"]) == 1
    assert "mamba2.py is missing" in capsys.readouterr().err


def test_bad_repo_id(saved):
    with pytest.raises(ValueError, match="repo_id='not a valid/id!!'"):
        publish(saved, "not a valid/id!!", dry_run=True)


def test_missing_token_fails_at_once(saved, hub, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match=r"HF_TOKEN.*hf auth login"):
        publish(saved, "someone/tiny", endpoint=hub.endpoint)
    assert hub.repos == {} and ("GET", "/api/whoami-v2") not in hub.requests
    notes = publish(saved, "someone/tiny", dry_run=True).notes  # a dry run says so instead of failing
    assert any("no Hub token" in note for note in notes)


def test_offline_mode_is_refused(saved, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        publish(saved, "someone/tiny", token=TOKEN)


def test_rejected_token(saved, hub):
    with pytest.raises(ValueError, match="rejected the token"):
        publish(saved, "someone/tiny", token="hf_wrong", endpoint=hub.endpoint)
    assert hub.repos == {}


def test_unreachable_hub_fails_within_seconds(saved, hub):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="Cannot reach the Hub"):
        publish(saved, "someone/tiny", token=TOKEN, endpoint=refused, timeout=1.0)
    silent = socket.socket()  # accepts connections (kernel backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        with pytest.raises(ConnectionError, match="did not answer within 1s"):
            publish(saved, "someone/tiny", token=TOKEN, endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}",
                    timeout=1.0)
    finally:
        silent.close()
    assert time.perf_counter() - start < 8.0


def _load_uploaded(files: dict, folder):
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Nemotron3ForCausalLM.from_pretrained(folder)


def test_upload_to_stand_in_hub(saved, model_and_tokenizer, hub, tmp_path):
    result = publish(saved, "someone/tiny", token=TOKEN, endpoint=hub.endpoint, private=True)
    assert result.url == f"{hub.endpoint}/someone/tiny" and result.commit_url.startswith(result.url + "/commit/")
    repo = hub.repos["someone/tiny"]
    assert repo["private"] is True
    planned = publish(saved, "someone/tiny", dry_run=True)
    assert sorted(repo["files"]) == [name for name, _ in planned.files]
    for name in repo["files"]:
        expected = planned.card.encode() if name == "README.md" else (saved / name).read_bytes()
        assert repo["files"][name] == expected, name
    assert hub.validated_yaml == [planned.card]  # the card's metadata went through the Hub's validation
    assert not set(os.listdir(saved)) - set(repo["files"]) - {"quickstart_prompt.pt"}
    assert ("GET", "/api/whoami-v2") in hub.requests and not [u for u in hub.unknown if "harness" not in u[1]]
    reloaded = _load_uploaded(repo["files"], tmp_path / "download")
    original = model_and_tokenizer[0].state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in original.items())

    again = publish(saved, "someone/tiny", token=TOKEN, endpoint=hub.endpoint)  # second push: same repo
    assert len(repo["commits"]) == 2 and again.repo_id == "someone/tiny"


def test_private_flag_on_existing_public_repo_is_reported(saved, hub):
    publish(saved, "someone/tiny", token=TOKEN, endpoint=hub.endpoint)
    result = publish(saved, "someone/tiny", token=TOKEN, endpoint=hub.endpoint, private=True)
    assert hub.repos["someone/tiny"]["private"] is False
    assert any("already existed and is public" in note for note in result.notes)


def test_push_model_to_hub_without_tokenizer(model_and_tokenizer, hub, tmp_path):
    model, _ = model_and_tokenizer
    result = push_model_to_hub(model, "tiny-pushed", token=TOKEN, endpoint=hub.endpoint,
                               training_summary={"steps": 3})
    assert result.repo_id == f"{USER}/tiny-pushed"  # a bare name lands in the token owner's namespace
    files = hub.repos[f"{USER}/tiny-pushed"]["files"]
    assert "tokenizer.json" not in files and any("no tokenizer" in w for w in result.report.warnings)
    assert b"| steps | 3 |" in files["README.md"]
    reloaded = _load_uploaded(files, tmp_path / "download")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())
