"""`pmakit push`: upload a finished folder to the Hub (e.g. to retry a failed push)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .exits import PUSH_FAILED


def cmd_push(args: argparse.Namespace) -> int:
    """Push-only: the same upload `merge --push-to-hub` makes, for a folder that is already complete."""
    from ..errors import InputError
    from ..io.hub_target import HubTarget

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{args.folder} is not a folder; give the folder to upload.")
    try:
        target = HubTarget(
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message or f"Upload {folder.resolve().name} with pmakit",
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    from ..io.hub import HubPushError, push_folder_to_hub

    try:
        url = push_folder_to_hub(folder, target)
    except HubPushError as e:
        print(f"pmakit: error: push failed: {' '.join(str(e).split())}", file=sys.stderr)
        return PUSH_FAILED
    print(f"pushed: {url}")
    return 0
