"""Saved checkpoints load in a Python that has only torch + transformers (trust_remote_code=True)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["transformers_nemotron3"] = None  # make the package unimportable
    import torch
    from transformers import AutoModelForCausalLM
    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    x = torch.load(folder + "/x.pt")
    with torch.no_grad():
        logits = model(x).logits
        gen = model.generate(x, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
        mtp = model.generate(x[:1], max_new_tokens=5, use_mtp=True, num_draft_tokens=2, eos_token_id=None)
    torch.save({"logits": logits, "gen": gen, "mtp": mtp}, folder + "/remote_out.pt")
    """
)


def test_remote_code_round_trip(tmp_path):
    model = Nemotron3ForCausalLM(tiny_config("latent_groups_mtp")).eval()
    folder = tmp_path / "ck"
    model.save_pretrained(folder)
    for source in os.listdir(folder):  # the exported code never imports our package
        if source.endswith(".py"):
            text = (folder / source).read_text()
            assert "transformers_nemotron3" not in text, source
    x = torch.randint(3, 96, (2, 9))
    torch.save(x, folder / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "to instantiate a model of type" not in proc.stderr  # nemotron_h config.json is our own format
    out = torch.load(folder / "remote_out.pt")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(x).logits)
        ref = model.generate(x, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out["gen"], ref)
    assert torch.equal(out["mtp"], ref[:1])  # MTP speculative decoding ships with the remote code
