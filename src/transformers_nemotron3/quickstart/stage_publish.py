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
    problems = check_folder(ctx.saved)
    problems = [str(p) for p in (problems or [])] if not isinstance(problems, bool) else ([] if problems else
                                                                                          ["check_folder failed"])
    report = publish(ctx.saved, REPO_ID, dry_run=True)
    return {"installed": True, "problems": problems, "report": str(report)[:2000]}, (
        f"dry run to {REPO_ID}: {'; '.join(problems) or 'folder ready'}; nothing uploaded")


def check(metrics: dict) -> str | None:
    return "; ".join(metrics["problems"]) or None


def status(metrics: dict) -> str | None:
    """A status other than ok/FAILED for this stage's result, or None."""
    return None if metrics["installed"] or metrics["problems"] else "skipped (publish not installed)"
