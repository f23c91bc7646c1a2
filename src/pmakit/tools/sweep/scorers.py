"""Scorers for `sweep`: ``score(folder) -> float`` on a merged model folder.

`trainer_scorer` runs a Trainer's ``evaluate`` on each merge; `text_loss_scorer` (what ``pmakit sweep --text``
uses) is the causal-LM loss on a held-out text file; `pmakit.lm_eval_scorer` (`pmakit.tools.sweep.lm_eval`)
runs lm-evaluation-harness. torch and transformers are imported when a scorer runs, not with this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ...errors import InputError, brief


__all__ = ["Scorer", "TextLossScorer", "causal_lm_nats", "load_weights_into", "text_loss_scorer", "trainer_scorer"]

Scorer = Callable[[Path], float]


def load_weights_into(model, folder: str | os.PathLike) -> None:
    """Copy a model folder's safetensors weights into ``model`` in place (tied tensors may be absent).

    Raises:
        InputError: the folder has no safetensors files, or a tensor is unknown, missing or of another shape.
    """
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no .safetensors files.")
    loaded = {k: v for f in files for k, v in load_file(f).items()}
    params = model.state_dict()
    unknown = sorted(set(loaded) - set(params))
    if unknown:
        raise InputError(f"{folder}: tensors {unknown[:5]} are not in the model.")
    ptrs = {params[k].data_ptr() for k in loaded}
    missing = sorted(k for k in params if k not in loaded and params[k].data_ptr() not in ptrs)
    if missing:
        raise InputError(f"{folder}: the model's tensors {missing[:5]} are missing.")
    with torch.no_grad():
        for name, value in loaded.items():
            if params[name].shape != value.shape:
                raise InputError(
                    f"{folder}: tensor {name} has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(params[name].shape)}."
                )
            params[name].copy_(value)


def trainer_scorer(trainer, metric: str = "eval_loss") -> Scorer:
    """A scorer that loads each merge into ``trainer.model``, runs ``trainer.evaluate()`` and returns ``metric``.

    The trainer's own weights are restored after each evaluation, so the trainer can go on training.

    Args:
        trainer: A `transformers.Trainer` with an evaluation dataset.
        metric: The key of ``trainer.evaluate()``'s result to score by.

    Returns:
        ``score(folder) -> float`` for `sweep`.
    """

    def score(folder: Path) -> float:
        model = trainer.model
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            load_weights_into(model, folder)
            metrics = trainer.evaluate()
        finally:
            model.load_state_dict(saved)
        if metric not in metrics:
            raise InputError(f"trainer.evaluate() returned no {brief(metric)}; it returned {sorted(metrics)}.")
        return float(metrics[metric])

    return score


def _read_held_out(path: Path) -> str:
    """The held-out text: an existing, non-empty UTF-8 text file (a binary file is refused by name)."""
    if not path.is_file():
        raise InputError(f"Held-out text file {path} does not exist.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"Held-out text file {path} is not UTF-8 text (byte {e.start}: {brief(data[e.start : e.start + 1])}); "
            "give a UTF-8 text file."
        ) from None
    if "\x00" in text:
        raise InputError(f"Held-out text file {path} holds NUL bytes (offset {text.index(chr(0))}): it is binary.")
    if not text.strip():
        raise InputError(f"Held-out text file {path} is empty: nothing to score.")
    return text


def _token_blocks(text: str, text_file: Path, tokenizer, max_length: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    blocks = [b for b in blocks if len(b) >= 2]
    if not blocks:
        raise InputError(f"Held-out text {text_file} has fewer than 2 tokens: nothing to score.")
    return blocks


def causal_lm_nats(model, blocks: list[list[int]], batch_size: int) -> tuple[float, int]:
    """(sum of next-token cross-entropy in nats, number of predicted tokens) over ``blocks``, in fp64."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for length in sorted({len(b) for b in blocks}, reverse=True):
            same = [b for b in blocks if len(b) == length]
            for start in range(0, len(same), batch_size):
                ids = torch.tensor(same[start : start + batch_size], device=device)
                logits = model(input_ids=ids).logits[:, :-1].double()
                targets = ids[:, 1:]
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
                ).item()
                count += targets.numel()
    return total, count


class TextLossScorer:
    """``score(folder)``: the causal-LM loss of a merged folder on a held-out text; see `text_loss_scorer`."""

    def __init__(self, text_file, tokenizer, *, batch_size: int, max_length: int, per: str, device) -> None:
        if per not in ("token", "byte"):
            raise InputError(f"`per` must be token or byte, got {brief(per)}.")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (batch_size, max_length)):
            raise InputError(
                f"batch_size and max_length must be integers, got {brief(batch_size)} and {brief(max_length)}."
            )
        if batch_size < 1 or max_length < 2:
            raise InputError(f"Need batch_size >= 1 and max_length >= 2, got {batch_size} and {max_length}.")
        self.path = Path(text_file)
        self.text = _read_held_out(self.path)
        self.tokenizer, self.batch_size, self.max_length, self.per = tokenizer, batch_size, max_length, per
        self.device = _checked_device(device)
        self.blocks: list[list[int]] | None = None
        self.bytes = 0

    def check(self, folder: str | os.PathLike) -> None:
        """Tokenise the text with the tokenizer (given, else ``folder``'s) and ``folder``'s position limit.

        `sweep` calls this before the first merge with the folder whose config and tokenizer the merges
        copy, so a text that gives no block fails at once.
        """
        from transformers import AutoConfig, AutoTokenizer

        tok = self.tokenizer
        if tok is None or isinstance(tok, (str, os.PathLike)):
            source = tok if tok is not None else folder
            try:
                tok = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as e:
                raise InputError(
                    f"Cannot load a tokenizer from {source} ({' '.join(str(e).split())[:200]}); "
                    "pass the tokenizer (--tokenizer)."
                ) from e
        positions = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
        self.blocks = _token_blocks(self.text, self.path, tok, min(self.max_length, positions or self.max_length))
        self.bytes = sum(len(tok.decode(b[1:]).encode("utf-8")) for b in self.blocks)

    def __call__(self, folder: Path) -> float:
        from transformers import AutoModelForCausalLM

        if self.blocks is None:
            self.check(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
        if self.device is not None:
            model.to(self.device)
        rows, top = model.get_input_embeddings().num_embeddings, max(max(b) for b in self.blocks)
        if top >= rows:
            raise InputError(
                f"The tokenizer gives token id {top}, but the model in {folder} embeds only {rows} ids: "
                "the tokenizer does not belong to this model."
            )
        total, count = causal_lm_nats(model, self.blocks, self.batch_size)
        return total / (count if self.per == "token" else self.bytes)


def _checked_device(device: str | None) -> str | None:
    """``device`` if torch knows it and it is present here (a CUDA device needs CUDA)."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"Unknown torch device {brief(device)}: {e}.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {brief(device)}: CUDA is not available on this machine.")
    return device


def text_loss_scorer(
    text_file: str | os.PathLike,
    tokenizer=None,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    per: str = "token",
    device: str | None = None,
) -> TextLossScorer:
    """A scorer: the causal-LM loss of a merged folder on a held-out UTF-8 text file (nats per token or byte).

    The text is split into blocks of ``max_length`` tokens, at most the model's ``max_position_embeddings``
    (each block's first token is context only).
    ``per="byte"`` divides the summed loss by the UTF-8 bytes of the predicted tokens, which compares
    tokenizers. The file and the options are checked here; the text is tokenised once, by ``check(folder)``
    (which `sweep` calls before its first merge) or at the first call.

    Args:
        text_file: The held-out UTF-8 text.
        tokenizer: A tokenizer, or a folder/Hub id; None takes the first scored folder's (the run's).
        batch_size: Blocks per forward pass.
        max_length: Tokens per block.
        per: ``token`` or ``byte``.
        device: Torch device to score on (default: CPU).

    Returns:
        ``score(folder) -> float``: the mean loss in nats for `sweep`.

    Raises:
        InputError: a missing, empty, binary or non-UTF-8 text file, or a bad option.
    """
    return TextLossScorer(text_file, tokenizer, batch_size=batch_size, max_length=max_length, per=per, device=device)
