"""The command line: trace, list, doctor; and the Go tool's flag-only form."""

from __future__ import annotations

import re
import sys

import click
import typer
from rich.console import Console
from rich.table import Table

from egress_auditor import __version__, host
from egress_auditor.compiler import show_warnings
from egress_auditor.errors import AuditorError, UsageError
from egress_auditor.plugins import registered, select

try:  # typer 0.2x vendors click: its exceptions are not click's own
    from typer._click import exceptions as _typer_click
except ImportError:  # older typer raises click's exceptions
    _typer_click = click.exceptions
CLICK_ERRORS = (click.ClickException, _typer_click.ClickException)
USAGE_ERRORS = (click.UsageError, _typer_click.UsageError)
EXITS = (click.exceptions.Exit, typer.Exit)
ABORTS = (click.exceptions.Abort, typer.Abort)

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="See which outbound connections a host makes, and write the firewall rules that allow exactly those.",
)

TRACE_EPILOG = """Examples:\n
  sudo egress-auditor trace --duration 60 > rules.sh\n
  sudo egress-auditor trace -t 5m -O iptables:verbose:2\n
  sudo egress-auditor trace -O iptables:format:restore -O iptables:policy:drop > rules.v4\n
  sudo egress-auditor -i ebpf -o iptables -O iptables:verbose:2   (the Go tool's form)\n
  sudo egress-auditor trace -O iptables:scope:cgroup -t 1h   (each rule only for the service that needed it)\n
  sudo egress-auditor trace -- pip install -r requirements.txt > rules.sh   (one command, run as you)"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"invalid duration {text!r}: use seconds (60) or a number with s, m or h (90s, 5m, 1h)")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


def _version(value: bool) -> None:
    if value:
        print(f"egress-auditor {__version__}")
        raise typer.Exit()


def _list(value: bool) -> None:
    if value:
        list_plugins()
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    list_: bool = typer.Option(
        False, "-l", "--list", callback=_list, is_eager=True, help="List input and output plugins with their options."
    ),
) -> None:
    """See which outbound connections a host makes, and write the rules that allow them."""


@app.command(epilog=TRACE_EPILOG)
def trace(
    duration: str | None = typer.Option(None, "--duration", "-t", help="Stop after this long: 60, 90s, 5m, 1h."),
    count: int | None = typer.Option(None, "--count", "-C", min=1, help="Stop after N connections."),
    inputs: list[str] = typer.Option([], "--input", "-i", help="Input plugin (repeatable); default ebpf."),
    outputs: list[str] = typer.Option([], "--output", "-o", help="Output plugin (repeatable); default iptables."),
    input_options: list[str] = typer.Option([], "--input-option", "-I", help="plugin:key:value for an input."),
    output_options: list[str] = typer.Option([], "--output-option", "-O", help="plugin:key:value for an output."),
    no_live: bool = typer.Option(False, "--no-live", help="One line per new flow on stderr instead of the live table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    no_lineage: bool = typer.Option(
        False, "--no-lineage", help="Attribute from /proc at event time only, without the kernel's process lineage."
    ),
    command: list[str] = typer.Argument(
        None,
        metavar="[-- CMD ARGS...]",
        help="Run CMD (as the sudo user) in a cgroup of its own, record only its connections and its "
        "descendants', stop when it exits, and exit with its status. Its stdout goes to stderr.",
        show_default=False,
    ),
) -> None:
    """Watch new outbound connections; print the rules that allow them on exit."""
    from egress_auditor.command import AuditedCommand, invoking_user
    from egress_auditor.flows import FlowTable
    from egress_auditor.lineage import LineageTracer
    from egress_auditor.live import LiveTable, PlainLog
    from egress_auditor.trace import TraceRun

    show_warnings(debug)
    seconds = parse_duration(duration) if duration is not None else None
    input_sel = select("input", inputs, input_options, default="ebpf")
    output_sel = select("output", outputs, output_options, default="iptables")
    table = FlowTable()
    console = Console(stderr=True)
    # The command's own output shares the terminal: one line per flow reads better than a redrawn table.
    plain = no_live or bool(command) or not console.is_terminal
    display = PlainLog(sys.stderr) if plain else LiveTable(console, table)
    run = TraceRun(
        inputs=input_sel.create(),
        outputs=output_sel.create(),
        display=display,
        duration=seconds,
        count=count,
        table=table,
        lineage=None if no_lineage else LineageTracer(),
        command=AuditedCommand(command, user=invoking_user()) if command else None,
    )
    raise typer.Exit(run.run())


RULES_EPILOG = """Examples:\n
  egress-auditor rules --from web-1.jsonl --from web-2.jsonl -o nftables > egress.nft\n
  egress-auditor rules --from flows.jsonl -O iptables:format:restore -O iptables:policy:drop > rules.v4\n
  logcli query --output raw '{job="egress-auditor"}' | egress-auditor rules --from - -o nftables"""

# Outputs that stream records rather than render rules: nothing to rebuild them from.
STREAMING_OUTPUTS = ("json", "loki")


@app.command(epilog=RULES_EPILOG)
def rules(
    sources: list[str] = typer.Option(
        [], "--from", "-f", help="A capture written by -o json (or its lines from Loki); repeatable; - is stdin."
    ),
    outputs: list[str] = typer.Option([], "--output", "-o", help="Output plugin (repeatable); default iptables."),
    output_options: list[str] = typer.Option([], "--output-option", "-O", help="plugin:key:value for an output."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Write the rules for saved captures, merging hosts and runs; needs no kernel access."""
    from egress_auditor.capture import read_captures

    if not sources:
        raise UsageError("rules needs at least one --from FILE: a capture written by trace -o json")
    firewalls = {n: p for n, p in registered("output").items() if n not in STREAMING_OUTPUTS}
    output_sel = select("output", outputs, output_options, default="iptables", available=firewalls)
    capture = read_captures(sources)
    for note in capture.notes:
        print(f"egress-auditor: {note}", file=sys.stderr)
    texts = [output.finish(capture.flows, capture.summary) for output in output_sel.create()]
    sys.stdout.write("".join(texts))
    sys.stdout.flush()
    print(
        f"egress-auditor: {len(capture.flows)} flows from {capture.runs} run(s) on {capture.summary.host}",
        file=sys.stderr,
    )


def list_plugins() -> None:
    for kind in ("input", "output"):
        flag = "-I" if kind == "input" else "-O"
        print(f"{kind}s (choose with -{kind[0]}, options with {flag} plugin:key:value):")
        for plugin in registered(kind).values():
            print(f"  {plugin.name}: {plugin.description}")
            for option in plugin.options:
                choices = f" [{'|'.join(option.choices)}]" if option.choices else ""
                default = option.default if option.default != "" else "(none)"
                print(f"      {plugin.name}:{option.key}{choices}  default {default}: {option.help}")
            if plugin.example:
                print(f"      example: egress-auditor trace {plugin.example}")
        print()


@app.command("list")
def list_command() -> None:
    """List input and output plugins with their options and an example."""
    list_plugins()


@app.command()
def doctor() -> None:
    """Show what this host offers and lacks for egress-auditor, with fixes."""
    results = host.checks()
    table = Table(title="egress-auditor doctor")
    for column in ("check", "state", "detail", "fix"):
        table.add_column(column, overflow="fold")  # a fix cut short is no fix
    for check in results:
        state = "ok" if check.ok else ("MISSING" if check.required else "absent (optional)")
        table.add_row(check.name, state, check.detail, "" if check.ok else check.fix)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    if any(c.required and not c.ok for c in results):
        raise typer.Exit(1)


LEGACY_PASSTHROUGH = {"-h", "--help", "--version", "-l", "--list"}


def normalise_argv(argv: list[str]) -> list[str]:
    """The Go tool had no subcommands: `egress-auditor -i ebpf ...` means trace."""
    if argv and argv[0].startswith("-") and argv[0] not in LEGACY_PASSTHROUGH:
        return ["trace", *argv]
    return argv


def main(argv: list[str] | None = None) -> None:
    args = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    try:
        # Without standalone mode, typer.Exit(code) comes back as the return value.
        status = app(args, prog_name="egress-auditor", standalone_mode=False)
    except EXITS as exc:
        sys.exit(exc.exit_code)
    except ABORTS:
        sys.exit(130)
    except CLICK_ERRORS as exc:
        print(f"egress-auditor: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, USAGE_ERRORS) else exc.exit_code)
    except AuditorError as exc:
        if debug:
            raise
        print(f"egress-auditor: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        sys.exit(130)
    if isinstance(status, int) and status:
        sys.exit(status)
