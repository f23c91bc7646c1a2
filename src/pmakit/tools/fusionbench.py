"""A FusionBench-style merge class: ``WeightedAverageForLLama(...).run(models)``.

The arguments of FusionBench's ``WeightedAverageForLLama`` (weights, normalize, backbone_only,
merged_model_save_path, save_tokenizer, push_to_hub) with its semantics, but streaming from disk
instead of holding every model in memory; see the class for exactly where the two differ.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from ..errors import MergeError
from ..io.hub_target import HubTarget, as_hub_target
from ..merging.merger import MergeResult, merge


__all__ = ["WeightedAverageForLLama"]


class WeightedAverageForLLama:
    """Weighted average of causal LMs, optionally of the backbone only, with FusionBench's semantics.

    Without ``base_model`` every model passed to :meth:`run` is averaged, one weight each; with
    ``backbone_only`` the tensors outside the backbone (see below) are taken unchanged from the first
    model, and config, generation config and tokenizer always come from the first model. This is
    FusionBench's documented call (no pre-trained model in the pool; its config: "otherwise the head
    of the first model will be used"), e.g. ``WeightedAverageForLLama(weights=[0.4, 0.6],
    backbone_only=True).run([a, b])`` gives ``0.4 a + 0.6 b`` with ``a``'s head.

    With ``base_model`` (FusionBench's ``_pretrained_``) the base is apart and not averaged:
    ``weights`` has one entry per model of :meth:`run`, ``backbone_only`` keeps the base's tensors
    outside the backbone, and config and tokenizer come from the base.

    Where pmakit differs from FusionBench 0.2.33:

    - Dtype of the sum: FusionBench multiplies and adds whole state dicts in the dtype the models
      were loaded in (bf16 models sum in bf16). pmakit folds each tensor in float32
      (``accumulate_dtype="float64"`` on request) and rounds once to the inputs' dtype.
    - Streaming: FusionBench loads every model into memory; pmakit reads one tensor (or row slice)
      at a time from the safetensors files, so memory does not grow with the number of models.
    - Which tensors ``backbone_only`` keeps: those matching ``backbone_patterns`` (by default the
      embeddings, LM head and final norm, i.e. everything outside the decoder layers of a Llama);
      FusionBench's config calls that part "the head".
    - Card: pmakit writes its own model card (the recipe, the weights, and the model the kept
      tensors come from, the first model when there is no base) and pushes it with the folder;
      FusionBench writes a card only when given its algorithm config.
    - ``weights`` may be omitted (equal weights); FusionBench requires them.

    Without ``merged_model_save_path`` the merge goes to a temporary folder and only the loaded
    model is returned.
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        normalize: bool = True,
        backbone_only: bool = True,
        merged_model_save_path: str | os.PathLike | None = None,
        save_tokenizer: bool = True,
        push_to_hub: str | HubTarget | bool | None = None,
        *,
        base_model: str | os.PathLike | None = None,
        **merge_kwargs,
    ) -> None:
        """Keep the settings; nothing is read until :meth:`run`.

        Args:
            weights: one weight per model of :meth:`run` (default: equal weights).
            normalize: divide the weights by their sum.
            backbone_only: average only the backbone; the other tensors (embeddings, LM head, final
                norm by default) come unchanged from ``base_model``, else from the first model.
            merged_model_save_path: the output folder (default: a temporary one, removed after loading).
            save_tokenizer: copy the tokenizer files.
            push_to_hub: a repo id or a `HubTarget`. ``True`` (deprecated) pushes to the save path's folder
                name; ``False`` is no push.
            base_model: a base model kept apart (not averaged): the donor of config, tokenizer and, with
                ``backbone_only``, of the tensors outside the backbone.
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

    def _hub_target(self) -> str | HubTarget | None:
        """``push_to_hub`` for `merge` (which checks it): ``True`` (deprecated) names the save path's folder."""
        if not isinstance(self.push_to_hub, bool):
            return self.push_to_hub
        return as_hub_target(self.push_to_hub, where="WeightedAverageForLLama", repo_for_true=self._repo_for_true)

    def _repo_for_true(self) -> str:
        if self.merged_model_save_path is None:
            raise MergeError("push_to_hub=True needs merged_model_save_path (its name is the repo id) or a repo id.")
        return os.path.basename(os.path.normpath(self.merged_model_save_path))

    def _check_counts(self, models: list) -> None:
        """At least one model, and one weight per model of `run` (the base, if any, is not among them)."""
        if not models:
            raise MergeError("WeightedAverageForLLama.run needs at least one model to average.")
        if self.weights is not None and len(self.weights) != len(models):
            besides = f" (besides the base {str(self.base_model)!r})" if self.base_model is not None else ""
            raise MergeError(
                f"Got {len(self.weights)} weights for {len(models)} models to average{besides}; "
                "give one weight per model."
            )

    def _merge_settings(self, models: list) -> dict:
        """`merge` settings: without a base, the first model gives config, tokenizer and the kept tensors."""
        base = self.base_model
        if base is None and self.backbone_only:
            base = models[0]  # also averaged: it only donates the tensors outside the backbone
        settings = dict(
            weights=self.weights,
            normalize=self.normalize,
            backbone_only=self.backbone_only,
            base_model=base,
            save_tokenizer=self.save_tokenizer,
            push_to_hub=self._hub_target(),
        )
        if self.base_model is None:  # FusionBench's donor is the first model; merge()'s the newest
            settings["config_source"] = "first"
        return {**settings, **self.merge_kwargs}

    def run(self, models: Sequence[str | os.PathLike], load: bool | None = None):
        """Merge ``models`` (folders or Hub ids, oldest first).

        Args:
            models: the models to average; without ``base_model`` the first gives config, tokenizer and,
                with ``backbone_only``, the tensors outside the backbone.
            load: with a save path, ``False`` returns the :class:`MergeResult` instead of the loaded model.

        Returns:
            The merged model loaded with ``AutoModelForCausalLM`` (always when no save path is set),
            else the :class:`MergeResult` when ``load=False``.

        Raises:
            MergeError: no model to average, a weight count that does not match, or any merge error.
        """
        averaged = list(models)
        self._check_counts(averaged)
        settings = self._merge_settings(averaged)
        if self.merged_model_save_path is None:
            with tempfile.TemporaryDirectory(prefix="pmakit-wa-") as tmp:
                self.result = merge(averaged, os.path.join(tmp, "merged"), **settings)
                return _load(self.result.output)
        self.result = merge(averaged, self.merged_model_save_path, **settings)
        return _load(self.result.output) if load is not False else self.result


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)
