"""The registry of averaging rules: one small class per rule, found by its name.

A rule declares its name, its parameters (each with help, a default and how a spec string
gives it), its closed-form weights, its running coefficient, its checks and the words a model
card uses. Everything that lists, checks or describes rules reads them from here, so a new rule
is one class (decorated with :func:`register`) and its tests.

A rule may be step-aware (``step_aware = True``): its weights then depend on the training
steps at which the samples were taken, not only on their count; every rule receives the steps
(``weights_for(n, steps)``), and the rules that are not step-aware ignore them.

Specs name a rule and its parameters in one string, parsed here only (:func:`parse_spec`):
``ema``, ``ema:0.1``, ``ema:alpha=0.1``, ``decay:cosine``. Values follow the rule's parameters in
their declared order, or name them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import InputError, brief


__all__ = [
    "MissingParameterError",
    "Param",
    "RangeError",
    "Rule",
    "RuleError",
    "UnknownRuleError",
    "UnusedParameterError",
    "parse_spec",
    "register",
    "rule_class",
    "rule_names",
    "spec_forms",
]


class RuleError(InputError):
    """A rule, or one of its settings, is wrong; ``param`` names the setting at fault (``None``: the rule).

    Each surface (`AveragingRule`, `PmaConfig`, `MergeOptions`, the sweep) names the setting in its
    own terms, so the parameter travels with the message.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownRuleError(RuleError):
    """No rule has this name (or the rule cannot be written as a spec)."""


class MissingParameterError(RuleError):
    """The rule needs a parameter that was not given."""


class UnusedParameterError(RuleError):
    """A parameter was given to a rule that does not use it; ``users`` are the rules that do."""

    def __init__(self, message: str, param: str, users: Sequence[str]) -> None:
        super().__init__(message, param)
        self.users = tuple(users)


class RangeError(RuleError):
    """A number outside the open interval ``(low, high)`` its parameter allows."""

    def __init__(self, message: str, param: str, value: Any, low: float, high: float) -> None:
        super().__init__(message, param)
        self.value, self.low, self.high = value, low, high


@dataclass(frozen=True)
class Param:
    """One parameter of a rule.

    Args:
        name: The keyword, as `AveragingRule` and `pmakit.merge` spell it.
        help: One line for users.
        default: The value when not given (``None``: not given).
        required: The rule cannot run without it.
        interval: An open interval ``(low, high)`` a number must lie in, checked for every rule.
        parse: How a spec string's text becomes the value (``None``: a spec cannot give it).
        choices: The named values, listed in errors and help (a spec must use one of them).
        expects: What a value looks like, for "needs ..." messages (default: the choices).
        card: Whether model cards record it (off where the card's weights already show it).
    """

    name: str
    help: str
    default: Any = None
    required: bool = False
    interval: tuple[float, float] | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] = ()
    expects: str = ""
    card: bool = True

    def describe_value(self) -> str:
        """What a value looks like, e.g. ``one of linear, cosine, 1-sqrt``."""
        return self.expects or f"one of {', '.join(self.choices)}"


_RULES: dict[str, type[Rule]] = {}


class Rule(abc.ABC):
    """An averaging rule over samples ``x_1..x_n`` (oldest first): closed form and running form.

    Subclasses set ``name``, ``title`` (card words) and ``params``, and write :meth:`weights_for` and
    :meth:`coefficient` (for ``k >= 2``; ``c_1`` is always 1), plus :meth:`check` for what the
    declared parameters cannot say alone. Instances hold the parameters as attributes. A running form
    that is not an average of itself may keep ``anchors`` (copies of the cycle's first sample) and
    correct the average after the last sample (:meth:`finish`).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    step_aware: ClassVar[bool] = False
    """The weights depend on the samples' training steps, which must then be given."""
    anchors: ClassVar[tuple[str, ...]] = ()
    """Buffers the running form keeps beside the average, each a copy of the cycle's first sample (``bema``:
    ``theta0``); online they are fp32 tensors per parameter, saved and restored with the average."""

    def __init__(self, **settings: Any) -> None:
        declared = self.param_names()
        for key in settings:
            if key not in declared:
                raise unused_parameter(key, self.name)
        for p in self.params:
            value = settings.get(p.name, p.default)
            setattr(self, p.name, value)
            if p.interval is not None:
                self._check_interval(p, value)
        self.check()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """The names of the parameters the rule declares, in order."""
        return tuple(p.name for p in cls.params)

    @classmethod
    def param(cls, name: str) -> Param:
        """The declared parameter called ``name`` (`KeyError` if none)."""
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def _check_interval(self, p: Param, value: Any) -> None:
        low, high = p.interval
        if not (low < value < high):
            message = f"The `{self.name}` rule's `{p.name}` must lie in ({low:g}, {high:g}), got {value}."
            raise RangeError(message, p.name, value, low, high)

    def check(self) -> None:
        """Refuse settings the parameters' declarations cannot judge alone (raise `RuleError`).

        Most rules need nothing beyond their parameters' declarations.
        """
        return None

    #: True where the rule's weights can be undefined for some cycle lengths (explicit weights, decay
    #: shapes): only those rules are checked over a whole cycle, an O(n) check (``fused_num`` may be huge).
    depends_on_cycle: ClassVar[bool] = False

    @abc.abstractmethod
    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        """Closed-form weights of ``n >= 1`` samples, oldest first; ``steps``: their training steps."""

    @abc.abstractmethod
    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        """``c_k`` of the running form for ``k >= 2``; ``n``: the window's length where known."""

    def finish(self, n: int, steps: Sequence[int] | None = None) -> dict[str, float]:
        """The running form's correction after the ``n``-th, last sample: ``{anchor: f}`` adds ``f (x_n - anchor)``
        to the average. None for rules without anchors: their running average is the merge."""
        return {}

    def words(self) -> str:
        """How a model card names the rule, e.g. ``EMA (alpha=0.2)``."""
        return self.title

    def settings(self, card: bool = False) -> dict[str, Any]:
        """The parameters as a recipe records them (``card``: only those a model card names)."""
        return {p.name: self.recorded(p.name) for p in self.params if p.card or not card}

    def recorded(self, name: str) -> Any:
        """A parameter's value as a recipe writes it (plain YAML data)."""
        return getattr(self, name)


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule to the registry under its ``name`` (a name may be taken once)."""
    if cls.name in _RULES and _RULES[cls.name] is not cls:
        raise InputError(f"An averaging rule named {brief(cls.name)} is already registered.")
    _RULES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a rule (for tests that register one at runtime)."""
    _RULES.pop(name, None)


def rule_names() -> tuple[str, ...]:
    """The registered rules, in the order they were registered."""
    return tuple(_RULES)


def rule_class(name: str) -> type[Rule]:
    """The rule called ``name``.

    Raises:
        UnknownRuleError: no rule has that name (the message lists the valid ones).
    """
    try:
        return _RULES[name]
    except (KeyError, TypeError):
        raise UnknownRuleError(f"Unknown averaging rule {brief(name)}; valid rules are {', '.join(_RULES)}.") from None


def users_of(param: str) -> tuple[str, ...]:
    """The rules that declare a parameter called ``param``."""
    return tuple(name for name, cls in _RULES.items() if param in cls.param_names())


def unused_parameter(param: str, rule: str) -> UnusedParameterError:
    """The error for a parameter given to a rule that does not use it."""
    users = users_of(param)
    if not users:
        takes = ", ".join(f"`{p}`" for p in rule_class(rule).param_names()) or "no parameters"
        message = f"No averaging rule has a parameter `{param}`; the `{rule}` rule takes {takes}."
        return UnusedParameterError(message, param, users)
    which = " or ".join(f"`{u}`" for u in users)
    noun = "rule" if len(users) == 1 else "rules"
    return UnusedParameterError(f"`{param}` is only used by the {which} {noun}, not by {rule!r}.", param, users)


def _spec_params(cls: type[Rule]) -> list[Param]:
    if any(p.required and p.parse is None for p in cls.params):
        raise UnknownRuleError(f"The `{cls.name}` rule cannot be written as a spec.")
    return [p for p in cls.params if p.parse is not None]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A rule spec as ``(rule name, parameters)``, checked by the rule: ``ema:0.1`` -> ``("ema", {"alpha": 0.1})``.

    Raises:
        UnknownRuleError: no rule has the name, or its required parameters cannot be written in a spec.
        RuleError: a value is unknown, malformed or refused by the rule; ``param`` names it.
    """
    name, colon, rest = spec.partition(":")
    cls = rule_class(name)
    params = _spec_params(cls)
    values: dict[str, Any] = {}
    for position, item in enumerate(rest.split(",") if colon else []):
        key, eq, text = item.partition("=")
        param = _spec_param(cls, params, key if eq else position)
        values[param.name] = _spec_value(param, text if eq else item)
    cls(**values)
    return cls.name, values


def _spec_param(cls: type[Rule], params: list[Param], key: str | int) -> Param:
    if isinstance(key, int):
        if key >= len(params):
            count = {0: "no parameters", 1: "one parameter"}.get(len(params), f"{len(params)} parameters")
            raise RuleError(f"The `{cls.name}` rule takes {count} in a spec.")
        return params[key]
    for p in params:
        if p.name == key:
            return p
    names = ", ".join(p.name for p in params) or "none"
    raise RuleError(f"The `{cls.name}` rule has no spec parameter {brief(key)}; it has {names}.")


def _spec_value(param: Param, text: str) -> Any:
    if param.choices and text not in param.choices:
        raise RuleError(f"the {param.name.replace('_', ' ')} must be {param.describe_value()}", param.name)
    try:
        return param.parse(text)
    except ValueError:
        raise RuleError(f"`{param.name}` must be {param.describe_value()}, got {brief(text)}", param.name) from None


def spec_forms() -> list[str]:
    """Every spec that names a rule fully without numbers: ``sma``, ..., ``decay:cosine``, for help and errors."""
    forms = []
    for cls in _RULES.values():
        try:
            params = _spec_params(cls)
        except UnknownRuleError:
            continue
        needed = [p for p in params if p.required]
        forms += [f"{cls.name}:{c}" for c in needed[0].choices] if needed else [cls.name]
    return forms
