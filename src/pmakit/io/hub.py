"""Hub upload and download for merged models, through the official `huggingface_hub` client.

`push_folder_to_hub` sends a finished model folder (merged offline, or `output_dir/pma` of an
online run) to a Hub repo: it creates the repo and the branch when they are missing, uploads the
folder as one commit (weights through LFS), and adds nothing that is not in the folder. Transient
failures (HTTP 5xx/429, dropped connections) are retried; a push that still fails raises
`HubPushError`, a one-line message that says what went wrong and that the local folder is kept.

`download_model` fetches only what a merge or `from_pretrained` needs: safetensors weights,
config, generation config, tokenizer files and the model card.

The token comes from the argument, else from ``HF_TOKEN`` or ``hf auth login`` (resolved by
`huggingface_hub`); it is never printed, logged or put in an error message. What went wrong is read
into those messages by `pmakit.io.hub_failures`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token

from ..errors import HubError, InputError, brief
from .hub_failures import download_failure, is_transient, push_reason, safe_cause, scrub
from .hub_target import HubTarget, hub_target_of


__all__ = [
    "DOWNLOAD_PATTERNS",
    "HubDownloadError",
    "HubPushError",
    "HubTarget",
    "download_model",
    "push_folder_to_hub",
]

logger = logging.getLogger(__name__)

#: Files `download_model` fetches by default (top level of the repo, or of ``subfolder``).
DOWNLOAD_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*.json",
    "*.model",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
)

#: Attempts of each Hub step (create repo, create branch, upload) on transient failures, and the
#: first wait between them in seconds (doubled each time). The client also retries its own calls.
RETRY_ATTEMPTS = 3
RETRY_WAIT = 2.0
_sleep = time.sleep  # replaced by the test suite to keep retries fast

T = TypeVar("T")


class HubPushError(HubError):
    """A push to the Hub failed; the local folder is untouched (``folder``).

    Attributes:
        folder: The local folder that was to be pushed (kept).
        repo_id: The target repo.
        status: The HTTP status of the last failure, if there was one.
    """

    def __init__(self, message: str, *, folder: Path, repo_id: str, status: int | None = None) -> None:
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id
        self.status = status


class HubDownloadError(HubError):
    """A download from the Hub failed: missing repo or revision, no access, or no reachable server.

    Attributes:
        repo_id: The repo asked for.
        revision: The revision asked for.
        status: The HTTP status of the failure, if there was one.
    """

    def __init__(self, message: str, *, repo_id: str, revision: str | None, status: int | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision
        self.status = status


def _with_retries(step: str, call: Callable[[], T]) -> T:
    wait = RETRY_WAIT
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as err:
            if attempt == RETRY_ATTEMPTS or not is_transient(err):
                raise
            logger.warning(
                "Hub %s failed (%s); retrying in %.0f s [%d/%d].",
                step,
                type(err).__name__,
                wait,
                attempt,
                RETRY_ATTEMPTS - 1,
            )
            _sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------- push
def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str | HubTarget,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    path_in_repo: str | None = None,
    create_pr: bool | None = None,
) -> str:
    """Upload the model folder ``folder`` to a Hub repo and return the commit URL.

    The repo is created if missing (``private`` applies only then), and so is the branch
    ``revision``; the folder's files are uploaded as one commit (weights through LFS) under
    ``path_in_repo`` (the repo root by default), or as a pull request with ``create_pr``. Nothing
    else is written and nothing is deleted. The token comes from ``token``, else ``HF_TOKEN`` or
    the login; it never appears in logs or errors.

    Args:
        folder: A finished model folder.
        repo_id: ``namespace/name`` (with the keywords below), or a `HubTarget` holding every setting.

    Returns:
        The URL of the commit (or of the pull request's commit).

    Raises:
        ValueError: the repo id is malformed, a `HubTarget` comes with keywords, or the folder is empty.
        InputError: a symlink in the folder points outside it (its target is named; nothing is sent).
        FileNotFoundError: ``folder`` is not a folder.
        HubPushError: the Hub refused or failed (after retries of transient errors). The local
            folder is kept; the message says where it is.
    """
    settings = dict(private=private, revision=revision, commit_message=commit_message, token=token)
    target = hub_target_of(
        repo_id, where="push_folder_to_hub", path_in_repo=path_in_repo, create_pr=create_pr, **settings
    )
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {folder} to the Hub: it is not a folder.")
    if not any(p.is_file() for p in folder.rglob("*")):
        raise InputError(f"Cannot push {folder} to the Hub: the folder is empty.")
    _check_links_stay_inside(folder)
    try:
        info, repo = _upload(folder, target)
    except Exception as err:
        raise _push_error(err, folder, target) from safe_cause(err, target.token)
    url = str(info.commit_url)
    logger.info("Pushed %s to %s: %s%s", folder, repo, url, f" (pull request {info.pr_url})" if info.pr_url else "")
    return url


def _check_links_stay_inside(folder: Path) -> None:
    """Refuse a symlink that leads out of ``folder``: the client would upload the outside file's bytes.

    A link to a file inside the folder is fine (the client uploads the target's bytes under the link's
    name). ``folder`` is already resolved, so a link is judged by where it really leads.
    """
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            link = Path(root, name)
            if not link.is_symlink():
                continue
            target = Path(os.path.realpath(link))
            if not target.is_relative_to(folder):
                raise InputError(
                    f"Cannot push {folder} to the Hub: {link.relative_to(folder)} is a symlink to {target}, "
                    "outside the folder; copy the file in (or remove the link) and push again."
                )


def _upload(folder: Path, target: HubTarget):
    """Create the repo and branch when missing, then upload the folder as one commit (each step retried)."""
    api = HfApi(token=target.token)
    repo_url = _with_retries(
        "create_repo", lambda: api.create_repo(target.repo_id, private=target.private, exist_ok=True)
    )
    repo = repo_url.repo_id
    if target.revision not in (None, constants.DEFAULT_REVISION) and not target.create_pr:
        _with_retries("create_branch", lambda: api.create_branch(repo, branch=target.revision, exist_ok=True))
    info = _with_retries(
        "upload",
        lambda: api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            path_in_repo=target.path_in_repo,
            commit_message=target.commit_message or f"Upload {folder.name} with pmakit",
            revision=target.revision,
            create_pr=target.create_pr,
        ),
    )
    return info, repo


def _push_error(err: BaseException, folder: Path, target: HubTarget) -> HubPushError:
    where = target.repo_id + (f" (revision {target.revision})" if target.revision else "")
    where += f", path {target.path_in_repo}" if target.path_in_repo else ""
    had_token = bool(target.token or get_token())
    reason, status = push_reason(err, target.repo_id, target.revision, had_token=had_token)
    message = scrub(
        f"Could not push {folder} to the Hub repo {where}: {reason}. The local folder is kept at {folder}.",
        target.token,
    )
    return HubPushError(message, folder=folder, repo_id=target.repo_id, status=status)


# --------------------------------------------------------------------------------------- download
_DOWNLOAD_ERRORS = (
    HfHubHTTPError,
    httpx2.HTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    EntryNotFoundError,
)


def _download_patterns(allow_patterns: Sequence[str] | str | None, sub: str) -> tuple[list[str], list[str] | None]:
    """(allow, ignore) patterns for `snapshot_download`: the top level (or ``sub``) only, unless told otherwise."""
    if isinstance(allow_patterns, str):
        allow_patterns = [allow_patterns]
    patterns = list(allow_patterns) if allow_patterns is not None else list(DOWNLOAD_PATTERNS)
    if sub:
        return [f"{sub}/{p}" for p in patterns], ([f"{sub}/*/*"] if allow_patterns is None else None)
    # top level only: a run repo also holds `pma/`, `last-checkpoint/`, ...
    return patterns, (["*/*"] if allow_patterns is None else None)


def download_model(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: Sequence[str] | None = None,
    *,
    subfolder: str | None = None,
) -> Path:
    """Download the files of a model repo that a merge or `from_pretrained` needs; return the local folder.

    By default only top-level files matching `DOWNLOAD_PATTERNS` are fetched (safetensors weights and
    their index, config, generation config, tokenizer files, chat template, model card); pickled
    checkpoints and other folders are not. ``allow_patterns`` replaces the default list. With
    ``subfolder`` (e.g. ``"pma"`` for the merged model of a pushed run) the patterns apply inside it
    and the returned path is that subfolder. Files land in the Hub cache (``cache_dir``).

    Args:
        repo_id: ``name`` or ``namespace/name``.
        revision: Branch, tag or commit (default: main).
        token: Hub token (default: ``HF_TOKEN``, else the stored login).
        cache_dir: Hub cache folder (default: the Hub's own).
        allow_patterns: File patterns to fetch, replacing `DOWNLOAD_PATTERNS`.
        subfolder: A folder of the repo to fetch instead of its top level.

    Returns:
        The local folder (in the Hub cache) holding the files.

    Raises:
        HubDownloadError: missing repo or revision, no access, nothing matched, or no reachable Hub.
    """
    sub = subfolder.strip("/") if subfolder else ""
    patterns, ignore = _download_patterns(allow_patterns, sub)
    at = f"{repo_id}" + (f" (revision {revision})" if revision else "")

    def fail(message: str, err: BaseException | None, status: int | None = None) -> HubDownloadError:
        exc = HubDownloadError(scrub(message, token), repo_id=repo_id, revision=revision, status=status)
        exc.__cause__ = safe_cause(err, token) if err is not None else None
        exc.__suppress_context__ = True
        return exc

    try:
        path = Path(
            snapshot_download(
                repo_id, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=patterns,
                ignore_patterns=ignore,
            )
        )  # fmt: skip
    except (RevisionNotFoundError, RepositoryNotFoundError, *_DOWNLOAD_ERRORS) as err:
        exc = fail(*download_failure(err, repo_id, revision, at))
        raise exc from exc.__cause__  # fail() chose the cause: the error, unless a message in it shows a token
    folder = path / sub if sub else path
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        where = f"{at} in {sub}/" if sub else at
        raise fail(f"Nothing to download from {where}: no file matches {brief(patterns)}.", None)
    return folder
