"""Stage ``publish``: ``nemotron3 publish --dry-run`` on the saved folder (validates it and renders the model card
from ``training_summary.json`` without uploading anything).

Uses ``transformers_nemotron3.publish`` when it is installed; otherwise the folder is only validated here and
the stage reports ``skipped (publish not installed)``.
"""

from __future__ import annotations

from .stage_save import folder_problems

NAME = "publish"
REPO_ID = "your-name/nemotron3-quickstart"


def run(ctx) -> tuple[dict, str]:
    if ctx.saved is None:
        raise ValueError("the publish stage needs the save stage in the same run; add 'save' to --stages")
    try:
        from ..publish import check_folder, publish
    except ImportError:
        problems = folder_problems(ctx.saved)
        return ({"installed": False, "problems": problems},
                f"folder validated here ({'; '.join(problems) or 'complete'}); nothing published")
    report = check_folder(ctx.saved)
    problems = list(report.problems)
    result = publish(ctx.saved, REPO_ID, dry_run=True) if not problems else None
    files = len(result.files) if result is not None else 0
    return {"installed": True, "problems": problems, "files": files, "card_chars": len(result.card) if result else 0}, (
        f"dry run to {REPO_ID}: {'; '.join(problems) or f'folder ready, {files} files with the model card'}; "
        "nothing uploaded")


def check(metrics: dict) -> str | None:
    return "; ".join(metrics["problems"]) or None


def status(metrics: dict) -> str | None:
    """A status other than ok/FAILED for this stage's result, or None."""
    return None if metrics["installed"] or metrics["problems"] else "skipped (publish not installed)"
