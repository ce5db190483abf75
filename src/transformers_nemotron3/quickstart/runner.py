"""`nemotron3 quickstart`: the life of a Nemotron 3 model in small, on a CPU, in a few minutes.

pretrain a tiny dense hybrid -> upcycle it to a MoE with an MTP head -> continue pretraining (NVFP4 emulation
with --nvfp4) -> SFT with the chat template (thinking on and off) -> multi-environment GRPO -> generate with a
thinking budget and MTP speculative decoding -> save with remote code -> reload in a fresh Python through
AutoModelForCausalLM(trust_remote_code=True) -> publish --dry-run.

Every stage checks that it did its job (the thresholds are in each stage's module docstring); the command exits
1 naming the stages that did not. Everything goes under --out: per-stage logs and curves, curves.png,
summary.json, and model/ (the saved model with its training_summary.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

from . import (stage_continue, stage_generate, stage_grpo, stage_pretrain, stage_publish, stage_reload, stage_save,
               stage_sft, stage_upcycle)
from .context import QuickstartContext, StageResult
from .sizes import SIZES
from .summary import plot_curves, summary_table, write_summary, write_training_summary

__all__ = ["STAGES", "TRAINING_STAGES", "main", "parse_stages"]

STAGES = {module.NAME: module for module in (stage_pretrain, stage_upcycle, stage_continue, stage_sft, stage_grpo,
                                              stage_generate, stage_save, stage_reload, stage_publish)}
TRAINING_STAGES = ("pretrain", "continue", "sft", "grpo")
NEEDS_SAVE = ("reload", "publish")


def parse_stages(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of stage names -> the names in pipeline order."""
    if text.strip() == "all":
        return list(STAGES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(f"--stages {text!r}: unknown stage(s) {unknown}; choose from {', '.join(STAGES)} or 'all'")
    for stage in NEEDS_SAVE:
        if stage in names and "save" not in names:
            raise ValueError(f"--stages {text!r}: {stage} reads the folder that 'save' writes; add save")
    return [s for s in STAGES if s in names]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemotron3 quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="all", help=f"comma-separated subset of: {', '.join(STAGES)} (default all)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model and step counts (default tiny)")
    p.add_argument("--out", default="nemotron3-quickstart", help="output directory (default ./nemotron3-quickstart)")
    p.add_argument("--nvfp4", action="store_true", help="continued pretraining in emulated NVFP4")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--no-train", default="", metavar="STAGES",
                   help=f"run these training stages ({', '.join(TRAINING_STAGES)}) with 0 steps: their checks "
                        "then fail, which shows what each check guards")
    return p


def run_stage(ctx: QuickstartContext, name: str) -> StageResult:
    """Run one stage, time it, check it; an exception becomes a FAILED result with the error."""
    module = STAGES[name]
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        metrics, message = module.run(ctx)
        problem = module.check(metrics)
        status = "FAILED" if problem else (getattr(module, "status", lambda m: None)(metrics) or "ok")
        if problem:
            message = f"{problem} ({message})"
    except Exception as error:  # noqa: BLE001 - reported, and the run ends with exit status 1
        with open(os.path.join(ctx.stage_dir(name), "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        return StageResult(name, "FAILED", {}, f"{type(error).__name__}: {error} (traceback in "
                           f"{os.path.join(ctx.out, name, 'error.txt')})", time.perf_counter() - wall,
                           time.process_time() - cpu, raised=True)
    return StageResult(name, status, metrics, message, time.perf_counter() - wall, time.process_time() - cpu)


def main(argv: list[str] | None = None) -> int:
    """Run the selected stages; print the summary; 0 when every stage did its job, else 1 (2: bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        stages = parse_stages(args.stages)
        no_train = frozenset(s.strip() for s in args.no_train.split(",") if s.strip())
        bad = sorted(no_train - set(TRAINING_STAGES))
        if bad:
            raise ValueError(f"--no-train {args.no_train!r}: {bad} are not training stages; use {TRAINING_STAGES}")
        if args.nvfp4 and "continue" not in stages:
            raise ValueError("--nvfp4 applies to the 'continue' stage, which --stages leaves out; add it or drop "
                             "--nvfp4")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
    except ValueError as error:
        parser.print_usage(sys.stderr)
        print(f"nemotron3 quickstart: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ctx = QuickstartContext(out=args.out, size=SIZES[args.size], size_name=args.size, seed=args.seed,
                            nvfp4=args.nvfp4, no_train=no_train)
    torch.manual_seed(args.seed)
    _quiet_libraries()
    print(f"nemotron3 quickstart: {len(stages)} stages ({', '.join(stages)}), size {args.size}, "
          f"{torch.get_num_threads()} threads, output in {args.out}", flush=True)
    raised = None
    for n, name in enumerate(stages, 1):
        print(f"[{n}/{len(stages)}] {name}", flush=True)
        if raised is not None:  # its successors would only fail for want of its output
            result = StageResult(name, f"not run ({raised} raised)")
        else:
            result = run_stage(ctx, name)
            raised = name if result.raised else None
        ctx.results.append(result)
        print(f"      {result.status}: {result.message}", flush=True)
    write_training_summary(ctx)
    write_summary(ctx)
    curves = plot_curves(ctx)
    print("\n" + summary_table(ctx.results))
    print(f"\nsummary.json{', curves.png' if curves else ''} and per-stage logs in {args.out}"
          + (f"; the model in {ctx.saved}" if ctx.saved else ""))
    failed = [r.name for r in ctx.results if r.failed]
    if failed:
        print(f"nemotron3 quickstart: FAILED stage(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _quiet_libraries() -> None:
    """Keep the terminal to one bar per stage: no dataset-map bars, no transformers / TRL info chatter."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
