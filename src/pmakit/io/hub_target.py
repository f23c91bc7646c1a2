"""Where a folder goes on the Hub: one value object for every push, checked before any work starts.

It imports nothing heavy, so a merge can validate its push target up front and pay for
`huggingface_hub` only when it pushes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..deprecation import warn_deprecated
from ..errors import InputError, brief


__all__ = ["HubTarget", "as_hub_target", "check_repo_id", "hub_target_of"]

_REPO_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
_TYPES = {
    "private": bool,
    "revision": str,
    "commit_message": str,
    "token": str,
    "path_in_repo": str,
    "create_pr": bool,
}


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
        ValueError: the repo id is not valid on the Hub, or a setting has the wrong type.
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
        for name, kind in _TYPES.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):  # the value is not shown: it may be the token
                wanted = "true or false" if kind is bool else "a string"
                raise InputError(f"HubTarget `{name}` must be {wanted}, got a {type(value).__name__}.")
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


def hub_target_of(repo: str | os.PathLike | HubTarget, *, where: str, **settings) -> HubTarget:
    """``repo`` as a `HubTarget` with ``settings`` (its fields; ``None`` means not given) folded in.

    Raises:
        InputError: ``repo`` is a `HubTarget` and a setting is given beside it, or ``repo`` is not a repo id.
    """
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(repo, HubTarget):
        if given:
            names = ", ".join(f"{k}=..." for k in given)
            raise InputError(f"{where}: put {names} in the HubTarget, not beside it: HubTarget(repo_id, {names}).")
        return repo
    if not isinstance(repo, (str, os.PathLike)):
        raise InputError(f"{where}: `push_to_hub` takes a repo id or a HubTarget, got {brief(repo)}.")
    return HubTarget(os.fspath(repo), **given)


def as_hub_target(
    push_to_hub: str | HubTarget | bool | None,
    *,
    where: str,
    default_message: str | None = None,
    repo_for_true: Callable[[], str] | None = None,
    **deprecated,
) -> HubTarget | None:
    """The one reading of every API's ``push_to_hub``: a repo id or a `HubTarget` (None: no push).

    ``deprecated`` are the API's old separate settings (``private``, ``revision``, ``commit_message``,
    ``token``...; ``None`` means not given): each one given warns and is folded into the target.
    ``push_to_hub=True`` (where the API had a bool, ``repo_for_true`` names its repo) warns too;
    ``False`` is no push. ``default_message`` is the commit message when the target has none.

    Raises:
        InputError: a `HubTarget` and a separate setting are both given, ``True`` where the API never took
            a bool, or not a valid repo id.
    """
    for name, value in deprecated.items():
        if value is not None:
            warn_deprecated(f"`{name}=` of {where}", f"write push_to_hub=HubTarget(repo_id, {name}=...) instead")
    if push_to_hub is None or push_to_hub is False:
        return None
    if push_to_hub is True:
        if repo_for_true is None:
            raise InputError(f"{where}: `push_to_hub` takes a repo id or a HubTarget, not True.")
        warn_deprecated(f"`push_to_hub=True` of {where}", "pass the repo id (push_to_hub='namespace/name') instead")
        push_to_hub = repo_for_true()
    target = hub_target_of(push_to_hub, where=where, **deprecated)
    if default_message is not None and target.commit_message is None:
        target = replace(target, commit_message=default_message)
    return target
