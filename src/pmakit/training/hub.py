"""Pushing the merged model of a finished run to the Hub, beside the Trainer's own pushes."""

from __future__ import annotations

import logging
from pathlib import Path

from ..io.hub import push_folder_to_hub
from ..io.hub_target import HubTarget
from ..online.config import PmaConfig
from .export import LATEST_DIR


__all__ = ["push_pma_folder"]

logger = logging.getLogger(__name__)


def push_pma_folder(args, config: PmaConfig, *, trainer=None, step: int | None = None) -> str | None:
    """Push ``output_dir/pma`` of a finished run that pushes to the Hub (``args.push_to_hub``).

    The merged model goes to ``config.hub_model_id`` when set (its own repo, at the root), else to
    the ``pma`` subfolder of the run's repo (``from_pretrained(repo, subfolder="pma")``). The
    Trainer's token, privacy flag and revision (``hub_token``, ``hub_private_repo``,
    ``hub_revision``) apply. Returns the commit URL, or None when there is no ``pma`` folder.
    """
    folder = Path(args.output_dir) / LATEST_DIR
    if not folder.is_dir():
        logger.info("PMA: no `%s` folder to push to the Hub.", folder)
        return None
    finish = getattr(trainer, "_finish_current_push", None)
    if callable(finish):
        finish()  # the Trainer's own background pushes go first: one commit at a time per repo
    if config.hub_model_id:
        repo_id, path_in_repo = config.hub_model_id, None
    else:
        repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or Path(args.output_dir).absolute().name
        path_in_repo = LATEST_DIR
    label = f"end of training, step {step}" if step is not None else "end of training"
    target = HubTarget(
        repo_id,
        private=getattr(args, "hub_private_repo", None),
        revision=getattr(args, "hub_revision", None),
        commit_message=f"PMA merged model ({label})",
        token=getattr(args, "hub_token", None),
        path_in_repo=path_in_repo,
    )
    return push_folder_to_hub(folder, target)
