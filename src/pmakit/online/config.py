"""PMA settings: `PmaConfig`, shared by the engine, `PmaCallback` and (prefixed `pma_`) `PmaArguments`.

The names follow MindSpore's PmaAdamW (`fused_algo`, `fused_num`, `interleave_step`,
`ema_alpha`) so migrating users recognise them. Settings are validated when built, with
messages that name the field and the allowed values.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields

from ..averaging import (
    ALGORITHMS,
    DECAY_SHAPES,
    AveragingRule,
    DecayShape,
    MissingParameterError,
    RangeError,
    RuleError,
    UnusedParameterError,
    fold_coefficients,
    parse_spec,
    rule_class,
)
from ..errors import InputError, brief
from ..settings import at_least, one_of, setting, settle
from .windows import WSD, check_merge_max_open, check_merge_steps, check_merge_window, merge_steps_value, window_cycle


__all__ = ["EXPORT_CHOICES", "OFFLOAD_CHOICES", "PmaConfig"]

OFFLOAD_CHOICES = ("none", "cpu")
RULE_FIELDS = {"alpha": "ema_alpha", "weights": "fused_weights", "decay_shape": "decay_shape"}
"""The field that holds each parameter of the averaging rules (online, weights are always normalised)."""
EXPORT_CHOICES = ("sync", "async")


def _rule_of(values: dict) -> AveragingRule:
    """The rule the settings describe: each field the rule declares, and the optional ones that are set.

    ``fused_algo`` may be a spec whose parameters have no field of their own (``ema_halflife:0.05``).
    """
    algo, spec_params = _split_algo(values["fused_algo"])
    declared = rule_class(algo).param_names()
    settings = {
        param: values.get(key)
        for param, key in RULE_FIELDS.items()
        if param in declared or values.get(key) is not None
    }
    if settings.get("alpha") is not None:
        settings["alpha"] = float(settings["alpha"])
    if settings.get("weights") is not None:
        settings["weights"] = tuple(settings["weights"])
    return AveragingRule(algo, **settings, params=spec_params or None)


def _check_algo(key: str, values: dict, name) -> None:
    """A rule name, or a spec ``name:params`` whose parameters the rule checks with the rest."""
    algo = values[key]
    if not isinstance(algo, str) or algo.partition(":")[0] not in ALGORITHMS:
        raise InputError(
            f"{name(key)} must be one of {', '.join(ALGORITHMS)}; got {brief(algo)} "
            "(a rule spec such as 'ema_halflife:0.1' also works)."
        )


def _split_algo(algo: str) -> tuple[str, dict]:
    """``"ema_halflife:0.05"`` -> ``("ema_halflife", {"half_life_fraction": 0.05})``; a plain name has no params."""
    if ":" not in algo:
        return algo, {}
    name, params = parse_spec(algo)
    for param in params:
        if param in RULE_FIELDS:
            raise RuleError(f"give `{param}` in its own field, not in the `fused_algo` spec {brief(algo)}", param)
    return name, params


def sample_steps_of_first_cycle(values: dict) -> list[int]:
    """The optimizer steps of the first cycle's samples: what a step-aware rule is checked against."""
    every, n = values["interleave_step"], values["fused_num"]
    first = (values["start_step"] // every + 1) * every
    return [first + i * every for i in range(n)]


def _check_rule(key: str, values: dict, name) -> None:  # noqa: ARG001 (a setting's check)
    """The rule's own checks, and its weights and running form over a cycle of `fused_num`; errors name the field."""
    values = window_cycle(values)  # under a merge schedule the rule averages one window
    try:
        rule = _rule_of(values)
        # A whole cycle only where the weights depend on its length: `fused_num` may be huge (10**9).
        n = values["fused_num"] if rule.rule.depends_on_cycle else min(values["fused_num"], 2)
        steps = sample_steps_of_first_cycle({**values, "fused_num": n}) if rule.rule.step_aware else None
        rule.weights_for(n, steps)
        fold_coefficients(rule, n, steps)
    except RuleError as err:
        raise InputError(
            _rule_message(err, RULE_FIELDS.get(err.param, err.param or "fused_algo"), values, name)
        ) from None


def _check_lm_eval_tasks(key: str, values: dict, name) -> None:
    """lm-eval scores run inside the PMA evaluation, so they need it on."""
    if values.get(key) and not values["eval"]:
        raise InputError(f"{name(key)} runs in PMA evaluations: set {name('eval')}.")


def _rule_message(err: RuleError, key: str, values: dict, name) -> str:
    algo, field_name = values["fused_algo"], name(key)
    if isinstance(err, RangeError):
        value = values.get(key, err.value)
        return f"{field_name} must lie in the open interval ({err.low:g}, {err.high:g}); got {brief(value)}."
    if isinstance(err, UnusedParameterError):
        users = " or ".join(f"{name('fused_algo')}={brief(u)}" for u in err.users)
        return f"{field_name} is only used with {users}; got {brief(algo)}."
    if isinstance(err, MissingParameterError):
        expects = rule_class(algo.partition(":")[0]).param(err.param).describe_value()
        return f"{name('fused_algo')}={brief(algo)} needs {field_name}: {expects}."
    return f"{field_name}: {err}"


@dataclass(frozen=True)
class PmaConfig:
    """PMA settings for the engine, `PmaCallback` and `create_pma_optimizer`.

    A sample is taken after optimizer step ``t`` when ``t > start_step`` and
    ``t % interleave_step == 0``; after ``fused_num`` samples a cycle ends.

    Each field is listed with its default and meaning in the settings table of the docs
    (generated from the fields' ``help`` metadata).

    Raises:
        ValueError: a setting is out of range; the message names the field and the allowed values.
    """

    fused_algo: str = setting(
        "sma",
        f"Averaging rule: one of {', '.join(ALGORITHMS)} ('weights' uses `fused_weights`, "
        "'decay' uses `decay_shape`, 'ema' and 'ema_corrected' use `ema_alpha`), or a rule spec carrying the "
        "rule's own parameters, e.g. 'ema_halflife:0.1,step_bias=100'.",
        _check_algo,
    )
    fused_num: int = setting(
        10,
        "Samples per cycle: after this many samples the merged model is written and the average restarts. "
        "With `merge_steps` it is set to a window's sample count (`merge_window / interleave_step`).",
        at_least(1),
    )
    interleave_step: int = setting(
        1000,
        "Optimizer steps between samples: a sample is taken after every `interleave_step`-th step.",
        at_least(1),
    )
    merge_steps: list[int] | str | None = setting(
        None,
        "Merge at these optimizer steps instead of back-to-back cycles, each merge averaging the samples of the "
        "last `merge_window` steps (windows may overlap), written as `pma-<step>`; or 'wsd': once, right before the "
        "decay of the Trainer's warmup_stable_decay schedule. Multiples of `interleave_step`, sorted.",
        check_merge_steps,
        convert=merge_steps_value,
        arg_type=list[str] | None,
    )
    merge_window: int | None = setting(
        None,
        "With `merge_steps`: the optimizer steps each merge averages, a multiple of `interleave_step` (a merge at "
        "step s takes the samples in (s - merge_window, s]).",
        check_merge_window,
    )
    merge_max_open: int = setting(
        2,
        "With `merge_steps`: the most windows open at once, counted in fp32 copies of the trainable weights (4 "
        "bytes per parameter): a window keeps one, plus one per anchor of the rule (a `bema` window keeps two); a "
        "schedule that needs more is refused.",
        check_merge_max_open,
    )
    ema_alpha: float = setting(
        0.2,
        "EMA weight of the newest sample, in (0, 1), for 'ema' and 'ema_corrected'. 'ema' starts at the "
        "first sample of a cycle (with few samples the oldest weighs most); 'ema_corrected' is the zero-start EMA "
        "divided by 1-(1-alpha)^n (weights rise toward the newest and sum to one: the form for short cycles).",
    )
    fused_weights: list[float] | None = setting(
        None,
        "Explicit per-sample weights, oldest first, one per sample of a cycle (rule 'weights').",
        convert=lambda weights: [float(w) for w in weights],
    )
    decay_shape: str | DecayShape | None = setting(
        None,
        f"Shape d of the 'decay' rule: one of {', '.join(DECAY_SHAPES)} (or, from Python, a callable "
        "with d(0)=1, d(1)=0). Sample i of fused_num=n weighs d((i-1)/n)-d(i/n): the merge emulates that LR decay "
        "over the cycle (WSM); 'linear' equals SMA.",
        _check_rule,  # the rule's fields (RULE_FIELDS) are all set by here
        arg_type=str | None,
    )
    start_step: int = setting(
        0,
        "No sample is taken at or before this optimizer step (skip the early, fast-moving phase).",
        at_least(0, kind="a non-negative integer"),
    )
    write_back: bool = setting(
        False,
        "At each cycle end copy the merged weights into the live model and train on from them "
        "(MindSpore PmaAdamW semantics; optimizer moments are kept). Off: training is untouched.",
    )
    eval: bool = setting(False, "Also evaluate on the PMA weights at each evaluation and log `eval_pma_*` metrics.")
    eval_lm_eval_tasks: list[str] | None = setting(
        None,
        "lm-evaluation-harness tasks to also score the PMA weights on at each evaluation (with `eval`; needs the "
        "`lm-eval` extra), logged as `eval_pma_<task>_<metric>`.",
        _check_lm_eval_tasks,
    )
    eval_lm_eval_include_path: str | None = setting(
        None, "A folder of extra lm-eval task YAMLs for `eval_lm_eval_tasks` (`--include_path`)."
    )
    eval_lm_eval_num_fewshot: int | None = setting(
        None, "Few-shot examples per prompt for `eval_lm_eval_tasks` (None: each task's default)."
    )
    eval_lm_eval_limit: float | None = setting(
        None, "At most this many examples per lm-eval task, or a fraction of them below 1 (None: all)."
    )
    offload: str = setting(
        "none",
        f"Where the fp32 average lives: one of {', '.join(OFFLOAD_CHOICES)}. 'cpu' keeps it in "
        "(pinned) CPU memory and, on CUDA, updates it off the training stream.",
        one_of(OFFLOAD_CHOICES),
    )
    save: bool = setting(
        True, "Write a complete model folder `pma-<step>` at each cycle end (and `pma` at the end of training)."
    )
    save_total_limit: int | None = setting(
        None,
        "Keep at most this many `pma-<step>` folders, deleting the oldest (None keeps all).",
        at_least(1, optional=True),
    )
    export: str = setting(
        "sync",
        f"How cycle-end exports run: one of {', '.join(EXPORT_CHOICES)}. 'async' snapshots the average "
        "to the CPU and writes the folder from a background thread while training goes on (joined before the next "
        "export, a checkpoint save and the end of training).",
        one_of(EXPORT_CHOICES),
    )
    sample_store: bool = setting(
        False,
        "Also keep every PMA sample as a model-only folder `pma-samples/step-<t>` (config, tokenizer, "
        "weights; no optimizer state), so any rule and window can be merged after training with `pmakit.merge`.",
    )
    sample_store_limit: int | None = setting(
        None,
        "Keep at most this many sample folders, deleting the oldest (None keeps all).",
        at_least(1, optional=True),
    )
    hub_model_id: str | None = setting(
        None,
        "Hub repo for the merged model when the run pushes to the Hub; default: the `pma` "
        "subfolder of the run's own repo.",
    )

    def __post_init__(self) -> None:
        for key, value in settle(PmaConfig, {f.name: getattr(self, f.name) for f in fields(self)}).items():
            object.__setattr__(self, key, value)  # frozen: normalised once, here
        if self.merge_steps is not None:  # the engine's own cycle is one window (its rule needs the count)
            object.__setattr__(self, "fused_num", self.merge_window // self.interleave_step)

    @property
    def rule(self) -> AveragingRule:
        """The averaging rule these settings describe."""
        return _rule_of(vars(self))

    def rule_card_settings(self) -> dict:
        """The rule's parameters a model card records, under these settings' names (e.g. ``ema_alpha``)."""
        return {RULE_FIELDS.get(k, k): v for k, v in self.rule.settings(card=True).items()}

    @property
    def cycle_steps(self) -> int:
        """Optimizer steps spanned by one full cycle."""
        return self.fused_num * self.interleave_step

    def is_sample_step(self, step: int) -> bool:
        """Whether a sample is taken after optimizer step ``step`` (counted from 1)."""
        return step > self.start_step and step % self.interleave_step == 0

    def is_stored_step(self, step: int) -> bool:
        """Whether the sample taken after optimizer step ``step`` is also kept in the sample store."""
        return self.sample_store and self.is_sample_step(step)

    def check_horizon(self, max_steps: int) -> None:
        """Warn when no cycle can complete within ``max_steps`` optimizer steps."""
        if max_steps <= 0 or self.merge_steps == WSD:
            return
        if self.merge_steps is not None:
            late = [s for s in self.merge_steps if s > max_steps]
            if late:
                warnings.warn(
                    f"PMA: the merges at steps {', '.join(map(str, late))} come after max_steps={max_steps}: "
                    "they will not be written.",
                    UserWarning,
                    stacklevel=3,
                )
            return
        samples = sum(1 for t in range(1, max_steps + 1) if self.is_sample_step(t)) if max_steps < 10**7 else None
        if samples is not None and samples < self.fused_num:
            warnings.warn(
                f"PMA: only {samples} sample(s) fit in {max_steps} optimizer steps (interleave_step="
                f"{self.interleave_step}, start_step={self.start_step}), fewer than fused_num={self.fused_num}: "
                "no cycle will complete and the final `pma` folder will hold the average of the samples so far.",
                UserWarning,
                stacklevel=3,
            )

    def to_dict(self) -> dict:
        return asdict(self)
