"""Stage ``reload``: a fresh Python, in which importing ``transformers_nemotron3`` is blocked, loads the saved
folder with ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` and computes logits.

Check: the reloaded model's logits equal the saved model's (max |difference| <= 1e-5) and it is not a class of
this package; its greedy tokens are compared as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from .stage_pretrain import held_out

NAME = "reload"
MAX_LOGIT_DIFF = 1e-5
NEW_TOKENS = 16

RELOAD = textwrap.dedent(
    """
    import sys, torch
    sys.modules["transformers_nemotron3"] = None  # prove the package is not needed to load
    from transformers import AutoModelForCausalLM
    folder, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    probe = torch.load(folder + "/../reload/probe.pt")
    with torch.no_grad():
        logits = m(input_ids=probe["ids"]).logits
        tokens = m.generate(probe["prompt"], max_new_tokens=probe["new_tokens"], do_sample=False)
    torch.save({"logits": logits, "tokens": tokens}, folder + "/../reload/reloaded.pt")
    print(type(m).__module__ + "." + type(m).__name__)
    """
)


@torch.no_grad()
def run(ctx) -> tuple[dict, str]:
    if ctx.saved is None:
        raise ValueError("the reload stage needs the save stage in the same run; add 'save' to --stages")
    work = ctx.stage_dir(NAME)
    ids = held_out(ctx)[:4]
    prompt = ids[:1, :16]
    model = ctx.model.eval()
    expected = {"logits": model(input_ids=ids).logits,
                "tokens": model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)}
    torch.save({"ids": ids, "prompt": prompt, "new_tokens": NEW_TOKENS}, os.path.join(work, "probe.pt"))
    proc = subprocess.run([sys.executable, "-c", RELOAD, ctx.saved, str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        with open(os.path.join(work, "reload_stderr.txt"), "w") as f:
            f.write(proc.stderr)
        return ({"max_logit_diff": float("inf"), "class": None, "same_tokens": False,
                 "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"},
                f"the fresh Python failed to load the folder (stderr in {work}/reload_stderr.txt)")
    got = torch.load(os.path.join(work, "reloaded.pt"))
    diff = float((got["logits"] - expected["logits"]).abs().max())
    same = torch.equal(got["tokens"], expected["tokens"])
    cls = proc.stdout.strip().splitlines()[-1]
    metrics = {"max_logit_diff": diff, "class": cls, "same_tokens": same}
    return metrics, f"loaded as {cls} without transformers_nemotron3; max |logit diff| {diff:.1e}, same tokens: {same}"


def check(metrics: dict) -> str | None:
    if metrics.get("error"):
        return f"reloading failed: {metrics['error']}"
    if metrics["class"].startswith("transformers_nemotron3"):
        return f"the reloaded class {metrics['class']} came from this package, not from the saved remote code"
    if not metrics["max_logit_diff"] <= MAX_LOGIT_DIFF:
        return f"reloaded logits differ by {metrics['max_logit_diff']:.2e} > {MAX_LOGIT_DIFF}"
    if not metrics["same_tokens"]:
        return "the reloaded model generates different greedy tokens"
    return None
