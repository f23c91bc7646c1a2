"""A FusionBench-style merge class: ``WeightedAverageForLLama(...).run(models)``.

Same arguments as FusionBench's ``WeightedAverageForLLama`` (weights, normalize, backbone_only,
merged_model_save_path, save_tokenizer, push_to_hub), but streaming from disk instead of holding
every model in memory, with backbone-only that takes effect, and a model card that reaches the Hub.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from ..errors import MergeError
from ..merging.merger import MergeResult, merge


__all__ = ["WeightedAverageForLLama"]


class WeightedAverageForLLama:
    """Weighted average of causal LMs, optionally of the backbone only.

    ``models`` passed to :meth:`run` are folders or Hub ids; with ``backbone_only`` the first one
    is the base (FusionBench's ``_pretrained_``) unless ``base_model`` is given: its embeddings,
    LM head and final norm are kept unchanged. Without ``merged_model_save_path`` the merge goes to
    a temporary folder and only the loaded model is returned.
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

    def run(self, models: Sequence[str | os.PathLike], load: bool | None = None):
        """Merge ``models``; return the loaded merged model (always when no save path is set)."""
        models = list(models)
        if not models:
            raise MergeError("WeightedAverageForLLama.run needs at least one model.")
        base = self.base_model if self.base_model is not None else (models[0] if self.backbone_only else None)
        settings = dict(
            weights=self.weights,
            normalize=self.normalize,
            backbone_only=self.backbone_only,
            base_model=base,
            save_tokenizer=self.save_tokenizer,
            push_to_hub=self._repo_id(),
            **self.merge_kwargs,
        )
        if self.merged_model_save_path is None:
            with tempfile.TemporaryDirectory(prefix="pmakit-wa-") as tmp:
                self.result = merge(models, os.path.join(tmp, "merged"), **settings)
                return _load(self.result.output)
        self.result = merge(models, self.merged_model_save_path, **settings)
        return _load(self.result.output) if load is not False else self.result


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)
