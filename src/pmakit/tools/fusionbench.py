"""A FusionBench-style merge class: ``WeightedAverageForLLama(...).run(models)``.

Same arguments and semantics as FusionBench's ``WeightedAverageForLLama`` (weights, normalize,
backbone_only, merged_model_save_path, save_tokenizer, push_to_hub; the base model apart and not
averaged, config and tokenizer from the base else the first model), but streaming from disk instead
of holding every model in memory, with backbone-only that takes effect, and a model card that
reaches the Hub.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from ..errors import MergeError
from ..merging.merger import MergeResult, merge


__all__ = ["WeightedAverageForLLama"]


class WeightedAverageForLLama:
    """Weighted average of causal LMs, optionally of the backbone only, with FusionBench's semantics.

    The base model (FusionBench's ``_pretrained_``) is named apart and is not averaged: it is
    ``base_model`` when given, else, with ``backbone_only``, the first model passed to :meth:`run`.
    ``weights`` has one entry per averaged model (the models other than that base). With
    ``backbone_only`` the base's embeddings, LM head and final norm are kept unchanged. Config,
    generation config and tokenizer come from the base if there is one, else from the first model
    (`merge` alone would take the newest). Without ``merged_model_save_path`` the merge goes to a
    temporary folder and only the loaded model is returned.
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        normalize: bool = True,
        backbone_only: bool = True,
        merged_model_save_path: str | os.PathLike | None = None,
        save_tokenizer: bool = True,
        push_to_hub: bool | str = False,
        *,
        base_model: str | os.PathLike | None = None,
        **merge_kwargs,
    ) -> None:
        """Keep the settings; nothing is read until :meth:`run`.

        Args:
            weights: one weight per averaged model (default: equal weights).
            normalize: divide the weights by their sum.
            backbone_only: keep embeddings, LM head and final norm of the base model.
            merged_model_save_path: the output folder (default: a temporary one, removed after loading).
            save_tokenizer: copy the tokenizer files.
            push_to_hub: a repo id, or ``True`` for the save path's folder name.
            base_model: the base model; when not given and ``backbone_only``, the first model of :meth:`run`.
            **merge_kwargs: further settings of :func:`pmakit.merge` (``accumulate_dtype``, ``out_dtype``, ...).
        """
        self.weights = list(weights) if weights is not None else None
        self.normalize = normalize
        self.backbone_only = backbone_only
        self.merged_model_save_path = merged_model_save_path
        self.save_tokenizer = save_tokenizer
        self.push_to_hub = push_to_hub
        self.base_model = base_model
        self.merge_kwargs = merge_kwargs
        self.result: MergeResult | None = None

    def _repo_id(self) -> str | None:
        if not self.push_to_hub:
            return None
        if isinstance(self.push_to_hub, str):
            return self.push_to_hub
        if self.merged_model_save_path is None:
            raise MergeError("push_to_hub=True needs merged_model_save_path (its name is the repo id) or a repo id.")
        return os.path.basename(os.path.normpath(self.merged_model_save_path))

    def _split_base(self, models: list) -> tuple[str | os.PathLike | None, list]:
        """``(base, models to average)``: the base is named apart and never averaged."""
        if self.base_model is not None:
            return self.base_model, models
        if self.backbone_only and models:
            return models[0], models[1:]
        return None, models

    def _check_counts(self, base, averaged: list) -> None:
        """One weight per averaged model, and at least one such model; messages say which model is the base."""
        besides = ""
        if base is not None:
            implied = self.base_model is None
            besides = f" besides the base {str(base)!r}" + (
                " (with backbone_only and no base_model the first model is the base; it is not averaged)"
                if implied
                else ""
            )
        if not averaged:
            raise MergeError(f"WeightedAverageForLLama.run needs at least one model to average{besides}.")
        if self.weights is not None and len(self.weights) != len(averaged):
            raise MergeError(
                f"Got {len(self.weights)} weights for {len(averaged)} models to average{besides}; "
                "give one weight per averaged model."
            )

    def _merge_settings(self, base, averaged: list) -> dict:
        settings = dict(
            weights=self.weights,
            normalize=self.normalize,
            backbone_only=self.backbone_only,
            base_model=base,
            save_tokenizer=self.save_tokenizer,
            push_to_hub=self._repo_id(),
        )
        if base is None:  # FusionBench takes config and tokenizer from the first model; merge() from the newest
            settings["config_source"] = "first"
        return {**settings, **self.merge_kwargs}

    def run(self, models: Sequence[str | os.PathLike], load: bool | None = None):
        """Merge ``models`` (folders or Hub ids, oldest first).

        Args:
            models: the models; with ``backbone_only`` and no ``base_model`` the first is the base.
            load: with a save path, ``False`` returns the :class:`MergeResult` instead of the loaded model.

        Returns:
            The merged model loaded with ``AutoModelForCausalLM`` (always when no save path is set),
            else the :class:`MergeResult` when ``load=False``.

        Raises:
            MergeError: no model to average, a weight count that does not match, or any merge error.
        """
        base, averaged = self._split_base(list(models))
        self._check_counts(base, averaged)
        settings = self._merge_settings(base, averaged)
        if self.merged_model_save_path is None:
            with tempfile.TemporaryDirectory(prefix="pmakit-wa-") as tmp:
                self.result = merge(averaged, os.path.join(tmp, "merged"), **settings)
                return _load(self.result.output)
        self.result = merge(averaged, self.merged_model_save_path, **settings)
        return _load(self.result.output) if load is not False else self.result


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)
