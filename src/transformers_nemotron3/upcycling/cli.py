"""`nemotron3 upcycle SRC DST --experts 8 --top-k 2 --granularity 1 ...`: offline streaming conversion."""

from __future__ import annotations

import argparse
import sys

from .config import ROUTERS, WEIGHT_SCALINGS, UpcyclingConfig


def _moe_layers(text: str):
    if text == "all":
        return "all"
    if text.startswith("every:"):
        return int(text.split(":", 1)[1])
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nemotron3 upcycle",
        description="Convert a dense checkpoint (Llama/Mistral/Qwen2/Qwen3 family or dense Nemotron-H) into a "
                    "Nemotron 3 MoE, streaming layer by layer into sharded safetensors in the official layout.",
    )
    p.add_argument("src", help="directory with the dense model's config.json and *.safetensors")
    p.add_argument("dst", help="output directory (must not exist; written atomically)")
    p.add_argument("--experts", type=int, default=8, help="E, expansion: copies of the dense FFN (default 8)")
    p.add_argument("--granularity", type=int, default=1, help="G: shards per dense FFN; E*G experts (default 1)")
    p.add_argument("--top-k", type=int, default=2, help="T: experts per token, a multiple of G (default 2)")
    p.add_argument("--router", choices=ROUTERS, default="sigmoid", help="router score function (default sigmoid)")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize-topk", dest="normalize_topk", action="store_true", default=None,
                      help="renormalise the top-k weights (exactly function preserving)")
    norm.add_argument("--no-normalize-topk", dest="normalize_topk", action="store_false",
                      help="do not renormalise (He et al.'s softmax-then-topK; approximately preserving)")
    p.add_argument("--weight-scaling", choices=WEIGHT_SCALINGS, default="auto", help="output-scale compensation rule")
    p.add_argument("--shared-expert", action="store_true", help="add a shared expert holding part of the dense FFN")
    p.add_argument("--shared-fraction", type=float, default=0.5, help="share of the dense output in the shared expert")
    p.add_argument("--moe-layers", type=_moe_layers, default="all",
                   help="'all', 'every:N' or a comma list of MLP-layer indices (Nemotron-H sources only)")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the random router rows")
    p.add_argument("--expert-noise", type=float, default=0.0, help="relative noise on expert weights (breaks exactness)")
    p.add_argument("--aux-loss-coef", type=float, default=1e-2, help="load-balancing loss coefficient in the config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    """Run the conversion; 0 on success, 2 with one error line on bad input."""
    args = build_parser().parse_args(argv)
    from .stream import upcycle_to_disk

    try:
        config = UpcyclingConfig(
            num_experts=args.experts, granularity=args.granularity, top_k=args.top_k, router=args.router,
            normalize_topk=args.normalize_topk, weight_scaling=args.weight_scaling, shared_expert=args.shared_expert,
            shared_expert_fraction=args.shared_fraction, moe_layers=args.moe_layers, router_init_std=args.router_std,
            expert_noise=args.expert_noise, aux_loss_coef=args.aux_loss_coef, seed=args.seed,
        )
        out = upcycle_to_disk(args.src, args.dst, config, max_shard_size=args.max_shard_size,
                              progress=not args.no_progress)
    except ValueError as exc:
        print(f"nemotron3 upcycle: error: {exc}", file=sys.stderr)
        return 2
    exact = "exactly" if config.preserves_function else "approximately"
    print(f"wrote {out} (E{config.num_experts} G{config.granularity} T{config.top_k}, {config.router} router; "
          f"reproduces the dense model {exact} at step 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
