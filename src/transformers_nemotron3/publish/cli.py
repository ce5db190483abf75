"""`nemotron3 publish DIR REPO_ID [--private] [--dry-run]`: check a saved checkpoint and upload it with a model card."""

from __future__ import annotations

import argparse
import sys

from .checks import _human
from .hub import publish


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nemotron3 publish",
        description="Check a folder written by save_pretrained (config, auto_map and code files, shards and index, "
                    "generation config, tokenizer and chat template), write a model card, and upload it to the "
                    "Hugging Face Hub. --dry-run checks and lists the files without sending anything.",
    )
    p.add_argument("folder", help="checkpoint folder (model.save_pretrained + tokenizer.save_pretrained)")
    p.add_argument("repo_id", help="target repository, 'namespace/name'")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded; send nothing")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--commit-message", default=None, help="title of the upload commit")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="allow a folder without tokenizer / chat template (the model alone)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds allowed for the Hub reachability check")
    p.add_argument("--show-card", action="store_true", help="print the README.md model card")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 0 when published (or, with --dry-run, ready), 1 when refused."""
    args = build_parser().parse_args(argv)
    try:
        result = publish(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.token,
                         endpoint=args.endpoint, commit_message=args.commit_message,
                         require_tokenizer=not args.no_tokenizer, timeout=args.timeout)
    except (ValueError, ConnectionError) as exc:
        print(f"nemotron3 publish: {exc}", file=sys.stderr)
        return 1
    report = result.report
    for name, why in report.skipped:
        print(f"skip {name}: {why}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    verb = "would upload" if result.dry_run else "uploaded"
    print(f"{verb} {len(result.files)} file(s) to {result.repo_id}:")
    for name, size in result.files:
        print(f"  {name:<44} {_human(size):>10}")
    if args.show_card:
        print(result.card)
    for note in result.notes:
        print(f"note: {note}")
    total = sum(size for _, size in result.files)
    done = f"done: {result.url} ({result.commit_url})" if not result.dry_run else "dry run: checks passed, nothing sent"
    print(f"{done}; {len(result.files)} file(s), {_human(total)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
