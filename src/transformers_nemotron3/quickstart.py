"""`nemotron3 quickstart`: build a tiny Nemotron 3, generate, save with remote code, reload with plain transformers.

Runs offline on a CPU in seconds and prints each step, so a new user sees the whole loop once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

RELOAD = textwrap.dedent(
    """
    import sys, torch
    sys.modules["transformers_nemotron3"] = None  # prove the package is not needed to load
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    x = torch.load(sys.argv[1] + "/quickstart_prompt.pt")
    out = m.generate(x, max_new_tokens=int(sys.argv[2]), do_sample=False)
    torch.save(out, sys.argv[1] + "/quickstart_reloaded.pt")
    print(type(m).__module__ + "." + type(m).__name__)
    """
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``--out DIR`` keeps the saved checkpoint (default: a temporary folder)."""
    parser = argparse.ArgumentParser(prog="nemotron3 quickstart", description=__doc__)
    parser.add_argument("--out", default=None, help="where to save the tiny checkpoint (kept afterwards)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers_nemotron3 import Nemotron3Config, Nemotron3ForCausalLM
    from transformers_nemotron3.tokenizer import build_tiny_tokenizer

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    config = Nemotron3Config(
        vocab_size=len(tokenizer), hidden_size=128, hybrid_override_pattern="MEM*EME", num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=32,
        chunk_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=128, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        mtp_hybrid_override_pattern="*E", pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Nemotron3ForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[1/4] built a tiny Nemotron 3: pattern {config.hybrid_override_pattern} + MTP '*E', "
          f"{n_params / 1e6:.2f}M parameters")

    messages = [{"role": "user", "content": "Say hello in three words."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    text = tokenizer.decode(out[0, prompt.shape[1]:])
    print(f"[2/4] greedy generation of {args.new_tokens} tokens (random weights, so the text is noise): {text[:80]!r}")

    folder = args.out or tempfile.mkdtemp(prefix="nemotron3-quickstart-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = sorted(os.listdir(folder))
    print(f"[3/4] saved to {folder}: {len([f for f in files if f.endswith('.safetensors')])} weight file(s), "
          f"{len([f for f in files if f.endswith('.py')])} modeling files, config.json with auto_map")

    torch.save(prompt, os.path.join(folder, "quickstart_prompt.pt"))
    proc = subprocess.run([sys.executable, "-c", RELOAD, folder, str(args.new_tokens)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        print("[4/4] FAILED: reloading with trust_remote_code did not work", file=sys.stderr)
        return 1
    reloaded = torch.load(os.path.join(folder, "quickstart_reloaded.pt"))
    same = torch.equal(reloaded, out)
    print(f"[4/4] reloaded with AutoModelForCausalLM(trust_remote_code=True) in a fresh Python without this "
          f"package as {proc.stdout.strip().splitlines()[-1]}; same tokens: {same}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
