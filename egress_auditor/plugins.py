"""Plugin declarations and `plugin:key:value` option parsing.

Built-in inputs and outputs register through the same entry points a
third-party package would use (groups egress_auditor.inputs.v1 /
egress_auditor.outputs.v1; the version changes when the Input or Output
contract does), and `egress-auditor list` is generated from these
declarations. A plugin that cannot be loaded is named on stderr and left out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TextIO

from egress_auditor.errors import AuditorError, UsageError
from egress_auditor.escape import terminal_text
from egress_auditor.inputs import Input
from egress_auditor.outputs import Output

GROUPS = {"input": "egress_auditor.inputs.v1", "output": "egress_auditor.outputs.v1"}
CONTRACTS: dict[str, type] = {"input": Input, "output": Output}


def contract_methods(protocol: type) -> set[str]:
    """The methods a protocol class declares (its optional ones included)."""
    return {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}


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


def _load(entry: EntryPoint, kind: str) -> Plugin:
    try:
        plugin = entry.load()
    except Exception as exc:  # any error of a third-party module: it must not stop the others
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(plugin, Plugin) or plugin.kind != kind:
        raise ValueError(f"{entry.value} is not an {kind} Plugin")
    return plugin


def registered(kind: str, stderr: TextIO | None = None) -> dict[str, Plugin]:
    """The plugins of one kind installed in this environment, by name; each one that fails to load is
    reported in a line on stderr and left out."""
    plugins: dict[str, Plugin] = {}
    for entry in entry_points(group=GROUPS[kind]):
        try:
            plugin = _load(entry, kind)
        except ValueError as exc:
            print(
                f"egress-auditor: {kind} plugin {terminal_text(entry.name)} skipped: {terminal_text(str(exc))}",
                file=stderr or sys.stderr,
            )
            continue
        plugins[plugin.name] = plugin
    return dict(sorted(plugins.items()))


@dataclass
class Selection:
    """The plugins chosen for a run, each with its parsed options."""

    kind: str
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugins: dict[str, Plugin] = field(default_factory=dict)

    def create(self) -> list[Any]:
        """One instance per chosen plugin; one that lacks part of the contract is refused in one line."""
        created = []
        for name, opts in self.chosen.items():
            instance = self.plugins[name].factory(opts)
            wanted = contract_methods(CONTRACTS[self.kind])
            missing = sorted(m for m in wanted if not callable(getattr(instance, m, None)))
            if missing:
                raise AuditorError(
                    f"{self.kind} plugin {terminal_text(name)} lacks {', '.join(missing)}: "
                    f"it was not written for {GROUPS[self.kind]}"
                )
            created.append(instance)
        return created


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
