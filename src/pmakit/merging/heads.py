"""The LM head of a merge: tied to the embeddings or a tensor of its own.

Inputs may disagree: one saves ``lm_head.weight``, another ties its head to its embedding matrix
(``tie_word_embeddings``). The output is untied as soon as one averaged input has a head of its own,
and a tied input then stands in with its embedding; a backbone-only merge keeps the base's tying.
"""

from __future__ import annotations

from ..errors import MergeError, brief
from ..io.safetensors import TensorInfo
from .sources import ModelSource


__all__ = ["LM_HEAD", "common_tensor_names", "lm_head_inputs", "is_tied", "output_tied"]

LM_HEAD = "lm_head.weight"


def is_tied(config: dict) -> bool:
    """Whether the LM head is the embedding (then ``lm_head.weight``, if saved, is not a tensor of its own)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def output_tied(sources: list[ModelSource], base: ModelSource | None, backbone_only: bool) -> bool:
    """Whether the output ties its LM head to its embeddings.

    Backbone-only merges keep the base's head, so they keep its tying. Otherwise the output is
    untied as soon as one averaged input has an LM head of its own: averaging it with the other
    inputs' heads (a tied input's head is its embedding matrix) is the only way not to drop it.
    """
    if backbone_only and base is not None:
        return is_tied(base.config)
    return all(is_tied(s.config) for s in sources) or not any(LM_HEAD in s.tensors for s in sources)


def common_tensor_names(sources: list[ModelSource], tied: bool) -> list[str]:
    """The tensor names every input holds, in the first input's order.

    The LM head is planned apart: left out when the output is ``tied``, else added once (a tied
    input stands in with its embedding, see `lm_head_inputs`; a backbone-only base gives its own).
    """

    def names_of(s: ModelSource) -> list[str]:
        return [n for n in s.tensors if n != LM_HEAD]

    first = sources[0]
    order = [n for n in first.tensors if n != LM_HEAD or not tied]
    if not tied and LM_HEAD not in order:
        order.append(LM_HEAD)
    wanted = set(order) - {LM_HEAD}
    for s in sources[1:]:
        have = set(names_of(s))
        missing = sorted(wanted - have)
        if missing:
            raise MergeError(f"Tensor {brief(missing[0])} is missing from input {s.label} (present in {first.label}).")
        extra = sorted(have - wanted)
        if extra:
            raise MergeError(f"Tensor {brief(extra[0])} of input {s.label} is missing from input {first.label}.")
    return order


def _tied_embedding(source: ModelSource, head: TensorInfo, owner: ModelSource) -> TensorInfo:
    """The embedding matrix a tied ``source`` uses as its LM head (the one ``embed`` tensor shaped like ``head``)."""
    found = [i for n, i in source.tensors.items() if "embed" in n and n != LM_HEAD and i.shape == head.shape]
    if len(found) != 1:
        raise MergeError(
            f"Input {source.label} ties its LM head to its embeddings (tie_word_embeddings) but input "
            f"{owner.label} has its own {brief(LM_HEAD)} {list(head.shape)}, and no single embedding of "
            f"{source.label} has that shape to stand in for its head; merge inputs with the same tying."
        )
    return found[0]


def lm_head_inputs(sources: list[ModelSource]) -> list[TensorInfo]:
    """Every input's LM head for an untied output: its own ``lm_head.weight``, or the embedding it is tied to."""
    owner = next(s for s in sources if LM_HEAD in s.tensors)
    head = owner.tensors[LM_HEAD]
    return [s.tensors[LM_HEAD] if LM_HEAD in s.tensors else _tied_embedding(s, head, owner) for s in sources]
