"""Where a folder goes on the Hub: one value object for every push, checked before any work starts.

It imports nothing heavy, so a merge can validate its push target up front and pay for
`huggingface_hub` only when it pushes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import InputError, brief


__all__ = ["HubTarget", "check_repo_id"]

_REPO_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class HubTarget:
    """Where a folder goes on the Hub: one value for every push pmakit makes.

    ``private`` applies only when the repo is created; ``revision`` is a branch, created when
    missing; ``path_in_repo`` puts the folder in a subfolder. The token never shows in ``repr``.
    The repo id is checked when the target is built, so a bad id fails before a long merge runs.

    Args:
        repo_id: ``name`` or ``namespace/name``.
        private: Create the repo private (only when it does not exist yet).
        revision: Branch to push to, created from main when missing.
        commit_message: The commit's title.
        token: Hub token (default: ``HF_TOKEN``, else the stored login).
        path_in_repo: Subfolder of the repo to upload into.
        create_pr: Open a pull request instead of committing to the branch.

    Raises:
        ValueError: the repo id is not valid on the Hub.
    """

    repo_id: str
    private: bool | None = False
    revision: str | None = None
    commit_message: str | None = None
    token: str | None = field(default=None, repr=False)
    path_in_repo: str | None = None
    create_pr: bool = False

    def __post_init__(self) -> None:
        check_repo_id(self.repo_id)
        if self.create_pr and self.revision not in (None, "main"):
            raise InputError(
                "`create_pr=True` opens a pull request against main; do not also pass "
                f"revision={brief(self.revision)}."
            )


def check_repo_id(repo_id: object) -> str:
    """Return ``repo_id`` if it is ``name`` or ``namespace/name`` as the Hub allows, else raise InputError."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if not 1 <= len(parts) <= 2 or not all(
        _REPO_NAME.match(p) and ".." not in p and not p.endswith(".") for p in parts
    ):
        raise InputError(
            f"Hub repo id must be 'name' or 'namespace/name' (letters, digits, '-', '_', '.'); got {brief(repo_id)}."
        )
    return repo_id
