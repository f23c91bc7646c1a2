"""Soups: averaging whole models with torch, beside the offline merger.

Greedy and learned soups, LoRA adapter averaging, the one weighted sum of tensors they share,
buffers (BatchNorm statistics, `update_bn`) and the torch front-end of weight scopes. The layer sits
on `pmakit.merging`, `pmakit.online` and `pmakit.io`; the Trainer glue (`pmakit.training`) builds on it.

Names are imported on first use, so that ``pmakit.soups.weighted_sum`` loads without the others (its
``weighted_sum`` is imported from that module: the package attribute of that name is the module).
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports


_EXPORTS = {
    "GreedySoupResult": "greedy",
    "SoupStep": "greedy",
    "greedy_soup": "greedy",
    "LearnedSoup": "learned",
    "fit_learned_soup": "learned",
    "soup_loss": "learned",
    "LoraAdapter": "lora",
    "average_lora_adapters": "lora",
    "load_lora_adapter": "lora",
    "lora_deltas": "lora",
    "average_models": "buffers",
    "merge_buffers": "buffers",
    "update_bn": "buffers",
    "Scope": "scopes",
    "ScopeDifference": "scopes",
    "compare_scopes": "scopes",
    "compute_scopes": "scopes",
    "format_scope_report": "scopes",
    "fuse_scopes": "scopes",
    "tensor_scope": "scopes",
    "warn_on_scope_differences": "scopes",
    "warn_if_scopes_differ": "scopes",
}

__all__ = [
    "GreedySoupResult",
    "LearnedSoup",
    "LoraAdapter",
    "Scope",
    "ScopeDifference",
    "SoupStep",
    "average_lora_adapters",
    "average_models",
    "compare_scopes",
    "compute_scopes",
    "fit_learned_soup",
    "format_scope_report",
    "fuse_scopes",
    "greedy_soup",
    "load_lora_adapter",
    "lora_deltas",
    "merge_buffers",
    "soup_loss",
    "tensor_scope",
    "update_bn",
    "warn_if_scopes_differ",
    "warn_on_scope_differences",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)


if TYPE_CHECKING:
    from .buffers import average_models, merge_buffers, update_bn
    from .greedy import GreedySoupResult, SoupStep, greedy_soup
    from .learned import LearnedSoup, fit_learned_soup, soup_loss
    from .lora import LoraAdapter, average_lora_adapters, load_lora_adapter, lora_deltas
    from .scopes import (
        Scope,
        ScopeDifference,
        compare_scopes,
        compute_scopes,
        format_scope_report,
        fuse_scopes,
        tensor_scope,
        warn_if_scopes_differ,
        warn_on_scope_differences,
    )
