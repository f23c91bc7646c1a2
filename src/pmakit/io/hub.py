"""Hub upload and download for merged models, through the official `huggingface_hub` client.

`push_folder_to_hub` sends a finished model folder (merged offline, or `output_dir/pma` of an
online run) to a Hub repo: it creates the repo and the branch when they are missing, uploads the
folder as one commit (weights through LFS), and adds nothing that is not in the folder. Transient
failures (HTTP 5xx/429, dropped connections) are retried; a push that still fails raises
`HubPushError`, a one-line message that says what went wrong and that the local folder is kept.

`download_model` fetches only what a merge or `from_pretrained` needs: safetensors weights,
config, generation config, tokenizer files and the model card.

The token comes from the argument, else from ``HF_TOKEN`` or ``hf auth login`` (resolved by
`huggingface_hub`); it is never printed, logged or put in an error message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token

from ..errors import HubError, InputError, brief
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
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
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


# --------------------------------------------------------------------------------------- errors
def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes/contexts, outermost first (the client wraps HTTP errors, e.g. in LFS uploads)."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _http_error(err: BaseException) -> HfHubHTTPError | None:
    return next((e for e in _chain(err) if isinstance(e, HfHubHTTPError) and e.response is not None), None)


def _transport_error(err: BaseException) -> httpx2.TransportError | None:
    return next((e for e in _chain(err) if isinstance(e, httpx2.TransportError)), None)


def _is_transient(err: BaseException) -> bool:
    http = _http_error(err)
    if http is not None:
        return http.response.status_code in _TRANSIENT_STATUS
    return _transport_error(err) is not None


def _where(response) -> str:
    try:
        request = response.request
    except (AttributeError, RuntimeError):  # httpx raises when a response has no request attached
        return ""
    if request is None:
        return ""
    url = urlsplit(str(request.url))
    return f" to {request.method} {url.scheme}://{url.netloc}{url.path}"  # no query: signed URLs stay out


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _scrub(text: str, token: str | bool | None) -> str:
    """Remove any token (the explicit one and the one the client would use) from a message."""
    secrets = {t for t in (token if isinstance(token, str) else None, get_token()) if t}
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _safe_cause(err: BaseException, token: str | bool | None) -> BaseException | None:
    """``err`` to chain for debugging, or None when any message in its chain shows a token."""
    secrets = {t for t in (token if isinstance(token, str) else None, get_token()) if t}
    texts = [str(e) for e in _chain(err)]
    return None if any(s in t for s in secrets for t in texts) else err


def _with_retries(step: str, call: Callable[[], T]) -> T:
    wait = RETRY_WAIT
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as err:
            if attempt == RETRY_ATTEMPTS or not _is_transient(err):
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


def _push_reason(err: BaseException, repo_id: str, revision: str | None, had_token: bool) -> tuple[str, int | None]:
    if isinstance(err, LocalTokenNotFoundError):
        return "no Hub token was found: pass `token=`, set HF_TOKEN or run `hf auth login`", None
    http = _http_error(err)
    if http is not None:
        status = http.response.status_code
        where = _where(http.response)
        if status == 401:
            if not had_token:
                return (
                    f"the Hub requires authentication (HTTP 401{where}) and no token was found: pass `token=`, "
                    "set HF_TOKEN or run `hf auth login`",
                    status,
                )
            return (
                f"the Hub rejected the token (HTTP 401{where}): check that it is valid and has write access",
                status,
            )
        if status == 403:
            return f"the token may not write to {repo_id} (HTTP 403{where}): use a token with write access", status
        if isinstance(http, RevisionNotFoundError):
            return f"revision {revision!r} was not found in {repo_id} (HTTP 404{where})", status
        if isinstance(http, RepositoryNotFoundError):
            return f"repository {repo_id} was not found or is not visible to this token (HTTP {status}{where})", status
        if status == 404:
            return f"not found (HTTP 404{where})", status
        server = http.server_message or ""
        suffix = f": {_one_line(server, 200)}" if server else ""
        retried = " after retries" if status in _TRANSIENT_STATUS else ""
        return f"the Hub answered HTTP {status}{where}{retried}{suffix}", status
    transport = _transport_error(err)
    if transport is not None:
        detail = f"{type(transport).__name__}: {_one_line(transport)}"
        return f"the connection to the Hub failed after retries ({detail})", None
    return f"{type(err).__name__}: {_one_line(err)}", None


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
        raise _push_error(err, folder, target) from _safe_cause(err, target.token)
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
    reason, status = _push_reason(err, target.repo_id, target.revision, had_token=had_token)
    message = _scrub(
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


def _download_failure(err: BaseException, repo_id: str, revision: str | None, at: str):
    """(message, error, HTTP status) for a failed download, naming what is missing or why the Hub refused."""
    if isinstance(err, RevisionNotFoundError):
        return f"Revision {revision!r} was not found in the Hub repo {repo_id}.", err, 404
    if isinstance(err, RepositoryNotFoundError):
        status = err.response.status_code if err.response is not None else None
        message = (
            f"The Hub repo {repo_id} was not found at {constants.ENDPOINT}, or it is private and the token cannot "
            "read it: check the id and pass a token with read access (`token=`, HF_TOKEN or `hf auth login`)."
        )
        return message, err, status
    http = _http_error(err)
    status = http.response.status_code if http is not None else None
    detail = f"HTTP {status}{_where(http.response)}" if http is not None else _one_line(err)
    return f"Could not download {at} from the Hub: {detail}.", err, status


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
        exc = HubDownloadError(_scrub(message, token), repo_id=repo_id, revision=revision, status=status)
        exc.__cause__ = _safe_cause(err, token) if err is not None else None
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
        exc = fail(*_download_failure(err, repo_id, revision, at))
        raise exc from exc.__cause__  # fail() chose the cause: the error, unless a message in it shows a token
    folder = path / sub if sub else path
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        where = f"{at} in {sub}/" if sub else at
        raise fail(f"Nothing to download from {where}: no file matches {brief(patterns)}.", None)
    return folder
