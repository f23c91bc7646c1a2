"""What went wrong in a Hub call, in one line: for `pmakit.io.hub`'s errors and retries.

The client wraps its HTTP errors (in LFS uploads, for one), so each question is asked of the whole
chain of causes: is there an HTTP answer, and is it worth a retry? Messages name the request
without its query (signed URLs stay out) and never show a token.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token


__all__ = ["TRANSIENT_STATUS", "download_failure", "is_transient", "push_reason", "safe_cause", "scrub"]

#: HTTP statuses worth a retry.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is worth a retry: an HTTP status of `TRANSIENT_STATUS`, or a dropped connection."""
    http = _http_error(err)
    if http is not None:
        return http.response.status_code in TRANSIENT_STATUS
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


def _secrets(token: str | bool | None) -> set[str]:
    """The explicit token and the one the client would use."""
    return {t for t in (token if isinstance(token, str) else None, get_token()) if t}


def scrub(text: str, token: str | bool | None) -> str:
    """Remove any token (the explicit one and the one the client would use) from a message."""
    for secret in _secrets(token):
        text = text.replace(secret, "***")
    return text


def safe_cause(err: BaseException, token: str | bool | None) -> BaseException | None:
    """``err`` to chain for debugging, or None when any message in its chain shows a token."""
    secrets = _secrets(token)
    texts = [str(e) for e in _chain(err)]
    return None if any(s in t for s in secrets for t in texts) else err


def push_reason(err: BaseException, repo_id: str, revision: str | None, had_token: bool) -> tuple[str, int | None]:
    """(why, HTTP status) for a failed push: the missing token, the refusal or the failure, in one line."""
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
        retried = " after retries" if status in TRANSIENT_STATUS else ""
        return f"the Hub answered HTTP {status}{where}{retried}{suffix}", status
    transport = _transport_error(err)
    if transport is not None:
        detail = f"{type(transport).__name__}: {_one_line(transport)}"
        return f"the connection to the Hub failed after retries ({detail})", None
    return f"{type(err).__name__}: {_one_line(err)}", None


def download_failure(err: BaseException, repo_id: str, revision: str | None, at: str):
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
