"""Plugin declarations and `plugin:key:value` option parsing.

Built-in inputs and outputs register through the same entry points a
third-party package would use (groups egress_auditor.inputs / .outputs), and
`egress-auditor list` is generated from these declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from egress_auditor.errors import UsageError

GROUPS = {"input": "egress_auditor.inputs", "output": "egress_auditor.outputs"}


@dataclass(frozen=True)
class Option:
    key: str
    help: str
    default: str
    choices: tuple[str, ...] = ()
    convert: Callable[[str], Any] = str  # raises ValueError on a bad value
    valid: str = ""  # what to say is valid when there are no choices

    def parse(self, plugin: str, value: str) -> Any:
        if self.choices and value not in self.choices:
            raise UsageError(f"invalid value {value!r} for {plugin}:{self.key}; valid: {', '.join(self.choices)}")
        try:
            return self.convert(value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"invalid value {value!r} for {plugin}:{self.key}; expected {self.valid or exc}") from None


@dataclass(frozen=True)
class Plugin:
    name: str
    kind: str  # "input" or "output"
    description: str
    factory: Callable[[dict[str, Any]], Any]
    options: tuple[Option, ...] = ()
    example: str = ""

    def defaults(self) -> dict[str, Any]:
        return {o.key: o.parse(self.name, o.default) for o in self.options}

    def option(self, key: str) -> Option:
        for option in self.options:
            if option.key == key:
                return option
        valid = ", ".join(o.key for o in self.options) or "none"
        raise UsageError(f"unknown option {key!r} for {self.kind} {self.name}; valid: {valid}")


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("a positive whole number")
    return number


def registered(kind: str) -> dict[str, Plugin]:
    plugins: dict[str, Plugin] = {}
    for entry in entry_points(group=GROUPS[kind]):
        plugin = entry.load()
        if isinstance(plugin, Plugin) and plugin.kind == kind:
            plugins[plugin.name] = plugin
    return dict(sorted(plugins.items()))


@dataclass
class Selection:
    """The plugins chosen for a run, each with its parsed options."""

    kind: str
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugins: dict[str, Plugin] = field(default_factory=dict)

    def create(self) -> list[Any]:
        return [self.plugins[name].factory(opts) for name, opts in self.chosen.items()]


def select(
    kind: str, names: Sequence[str], options: Iterable[str], default: str, available: dict[str, Plugin] | None = None
) -> Selection:
    """Validate `-i/-o NAME` and `-I/-O plugin:key:value` for one plugin kind."""
    plugins = registered(kind) if available is None else available
    flag = "-I" if kind == "input" else "-O"
    wanted = list(dict.fromkeys(names or [default]))
    for name in wanted:
        if name not in plugins:
            raise UsageError(f"unknown {kind} plugin {name!r}; valid: {', '.join(plugins)}")
    chosen = {name: plugins[name].defaults() for name in wanted}
    for text in options:
        parts = text.split(":", 2)
        if len(parts) != 3 or not all(parts[:2]):
            raise UsageError(
                f"malformed option {text!r} for {flag}: expected plugin:key:value, "
                f"e.g. {next(iter(plugins.values())).example or 'plugin:key:value'}"
            )
        name, key, value = parts
        if name not in plugins:
            raise UsageError(f"unknown {kind} plugin {name!r} in {flag} {text!r}; valid: {', '.join(plugins)}")
        option = plugins[name].option(key)
        if name not in chosen:
            raise UsageError(
                f"{flag} {text!r} is for {kind} {name!r}, which is not selected (add {flag.lower()} {name})"
            )
        chosen[name][key] = option.parse(name, value)
    return Selection(kind, chosen, plugins)
