"""Upload a checked Nemotron 3 folder, with its model card, to the Hugging Face Hub.

``publish(folder, repo_id)`` runs, in order, and stops at the first failure with an error that names it:

1. :func:`check_folder` (no network): a folder that would not load is refused before anything is sent;
2. the model card is built (``README.md``; a README already in the folder is kept as it is);
3. ``dry_run=True`` stops here and returns the plan: the files, their sizes, the card;
4. a token is required (``token=``, ``HF_TOKEN``, or ``hf auth login``); ``HF_HUB_OFFLINE=1`` is refused;
5. one bounded probe, ``GET /api/whoami-v2``, in a daemon thread that is abandoned after ``timeout`` seconds:
   an unreachable endpoint or a rejected token fails here in seconds instead of inside huggingface_hub's
   client, whose HTTP session has no timeout and whose upload calls retry with back-off;
6. ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder`` on a staging folder of symlinks to the
   checked files plus the card, so the user's folder is never written and skipped files never leave.

Once the probe passed, uploading is huggingface_hub's job (its progress display, retries, Xet/LFS).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .checks import FolderReport, check_folder
from .model_card import build_model_card

DEFAULT_COMMIT_MESSAGE = "Upload Nemotron 3 checkpoint with transformers-nemotron3"


@dataclass
class PublishResult:
    """What :func:`publish` did, or with ``dry_run`` would do.

    Attributes:
        repo_id: the target repository (the namespace filled in by the Hub after a real upload).
        files: ``(name, size in bytes)`` uploaded, README.md included.
        card: the README.md text.
        report: the folder check.
        dry_run: nothing was sent when True.
        url: the repository URL (``None`` for a dry run).
        commit_url: the commit that holds the files (``None`` for a dry run).
        notes: things worth saying to the user (a missing token on a dry run, a repo that stayed public...).
    """

    repo_id: str
    files: list[tuple[str, int]]
    card: str
    report: FolderReport
    dry_run: bool
    url: str | None = None
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    require_tokenizer: bool = True,
    timeout: float = 10.0,
) -> PublishResult:
    """Check ``folder`` and upload it with a model card to ``repo_id`` on the Hub (see the module docstring).

    Args:
        folder: a folder written by ``model.save_pretrained`` and ``tokenizer.save_pretrained``.
        repo_id: ``namespace/name`` (or ``name`` for the token owner's namespace).
        private: create the repository private (an existing repository keeps its visibility; a note says so).
        dry_run: check and build the card, send nothing, return what would be uploaded.
        token: a Hub token; default ``HF_TOKEN`` or the one saved by ``hf auth login``.
        endpoint: the Hub URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        commit_message: the commit's title.
        require_tokenizer: refuse a folder without tokenizer and chat template (default); ``False`` for a model
            pushed alone.
        timeout: seconds allowed for the reachability/token probe.

    Raises:
        ValueError: a folder that would not load (every problem listed), a bad ``repo_id``, no token, a token
            the Hub rejects, or offline mode.
        ConnectionError: the Hub did not answer the probe within ``timeout`` seconds.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository id ({exc}); use 'namespace/name'.") from None
    if timeout <= 0:
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds.")
    report = check_folder(folder, require_tokenizer=require_tokenizer)
    report.raise_for_problems()
    names = {name for name, _ in report.files}
    card = (Path(folder) / "README.md").read_text(encoding="utf-8") if "README.md" in names else str(
        build_model_card(report, repo_id))
    files = sorted([f for f in report.files if f[0] != "README.md"] + [("README.md", len(card.encode()))])
    result = PublishResult(repo_id=repo_id, files=files, card=card, report=report, dry_run=dry_run)
    if "README.md" in names:
        result.notes.append("the folder's own README.md is uploaded as the model card (no card generated)")
    if dry_run:
        if _find_token(token) is None:
            result.notes.append("no Hub token found: a real run would stop; set HF_TOKEN or run `hf auth login`")
        return result

    from huggingface_hub import HfApi, constants

    resolved = _find_token(token)
    if resolved is None:
        raise ValueError("No Hugging Face token: set the HF_TOKEN environment variable, run `hf auth login`, "
                         "or pass token=...; a token with write access is needed to create and upload a repo.")
    if constants.HF_HUB_OFFLINE:
        raise ValueError("HF_HUB_OFFLINE=1 is set, so huggingface_hub sends nothing; unset it to publish "
                         "(or use dry_run=True / --dry-run to only check the folder).")
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    user = probe_hub(endpoint, resolved, timeout)
    api = HfApi(endpoint=endpoint, token=resolved)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    result.repo_id, result.url = repo_url.repo_id, str(repo_url)
    if private and not api.model_info(result.repo_id).private:
        result.notes.append(f"{result.repo_id} already existed and is public: private=True does not change an "
                            "existing repository; change its visibility in its settings on the Hub")
    with tempfile.TemporaryDirectory(prefix="nemotron3-publish-") as stage:
        for name, _ in report.files:
            if name != "README.md":
                try:
                    os.symlink(report.folder / name, Path(stage) / name)
                except OSError:  # no symlinks (e.g. Windows without the privilege): copy
                    shutil.copy2(report.folder / name, Path(stage) / name)
        (Path(stage) / "README.md").write_text(card, encoding="utf-8")
        commit = api.upload_folder(folder_path=stage, repo_id=result.repo_id, repo_type="model",
                                   commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
    result.commit_url = commit.commit_url
    result.notes.append(f"uploaded as {user}")
    return result


def probe_hub(endpoint: str, token: str, timeout: float) -> str:
    """Ask ``endpoint`` who owns ``token``, giving up after ``timeout`` seconds; return the user name.

    Runs in a daemon thread (a stalled DNS lookup or connection cannot keep the caller, nor interpreter exit).

    Raises:
        ConnectionError: no answer in time, or the connection failed.
        ValueError: the Hub rejected the token (HTTP 401/403).
    """
    from huggingface_hub.utils import build_hf_headers, get_session

    outcome: dict = {}

    def ask() -> None:
        try:
            outcome["response"] = get_session().get(f"{endpoint}/api/whoami-v2", timeout=timeout,
                                                    headers=build_hf_headers(token=token))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    worker = threading.Thread(target=ask, name="nemotron3-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    hint = "check the network, HF_ENDPOINT / endpoint=, or use --dry-run to check the folder offline"
    if worker.is_alive() or "Timeout" in type(outcome.get("error")).__name__:
        raise ConnectionError(f"The Hub at {endpoint} did not answer within {timeout:g}s; {hint}.")
    if "error" in outcome:
        exc = outcome["error"]
        raise ConnectionError(f"Cannot reach the Hub at {endpoint} ({type(exc).__name__}: {exc}); {hint}.") from exc
    response = outcome["response"]
    if response.status_code in (401, 403):
        raise ValueError(f"The Hub at {endpoint} rejected the token (HTTP {response.status_code}): set a valid "
                         "HF_TOKEN or run `hf auth login --force` with a token that has write access.")
    if response.status_code >= 400:
        raise ConnectionError(f"The Hub at {endpoint} answered HTTP {response.status_code} to a token check; "
                              f"{hint}.")
    try:
        return str(response.json().get("name", "?"))
    except ValueError:
        raise ConnectionError(f"{endpoint} answered, but not like the Hugging Face Hub (not JSON); {hint}.") from None


def _find_token(token: str | None) -> str | None:
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()
