"""The command line: trace, rules, list, doctor; and the flag-only form (`-i ebpf -o iptables`)."""

from __future__ import annotations

import re
import sys

import click
import typer
from rich.console import Console
from rich.table import Table

from egress_auditor import __version__
from egress_auditor.capture.flows import FLOW_CAP
from egress_auditor.errors import AuditorError, UsageError
from egress_auditor.host import doctor
from egress_auditor.host.compiler import show_warnings
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
  sudo egress-auditor -i ebpf -o iptables -O iptables:verbose:2   (the Go original's form)\n
  sudo egress-auditor trace -O iptables:scope:cgroup -t 1h   (each rule only for the service that needed it)\n
  sudo egress-auditor trace -- pip install -r requirements.txt > rules.sh   (one command, run as you)\n
  sudo egress-auditor trace --baseline ci-egress.jsonl -- make test   (exit 3 if it talks to something new)"""

RAW_CMDLINES_HELP = (
    "Write command lines as they were. By default the secrets they carry (passwords after -u/--user and "
    "-p/--password, token=/secret=/key=/password= values, user:password@ in URLs, Authorization and Cookie "
    "headers) are written as *** in every output."
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"invalid duration {text!r}: use seconds (60) or a number with s, m or h (90s, 5m, 1h)")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


def optional_duration(text: str | None) -> float | None:
    return parse_duration(text) if text is not None else None


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


# trace's options whose help runs over a line: declared here, so trace() reads as its parameters and one call.
SUMMARY_EVERY_OPTION = typer.Option(
    None,
    "--summary-every",
    help="Without the live table: a summary line on stderr this often (flows, connections, "
    "events lost, memory): 10m, 1h.",
)
NO_LINEAGE_OPTION = typer.Option(
    False, "--no-lineage", help="Attribute from /proc at event time only, without the kernel's process lineage."
)
BASELINE_OPTION = typer.Option(
    [],
    "--baseline",
    help="Captures of known traffic (repeatable): report only what they do not cover; exit 3 if anything drifted.",
)
SNAPSHOT_EVERY_OPTION = typer.Option(
    None,
    "--snapshot-every",
    metavar="DURATION",
    help="Every DURATION (10m), rewrite the rule files (iptables:dir, nftables:file) as a stop would, and "
    "append a checkpoint of every flow's counts to json:file. SIGUSR1 asks for a snapshot at once.",
)
RESUME_OPTION = typer.Option(
    [],
    "--resume",
    metavar="FILE",
    help="Carry on from a capture written by -o json (repeatable): its flows and counts are in the rules and "
    "the summary. With -O json:file: on the same file, the run appends to what it resumed from.",
)
FLOW_CAP_OPTION = typer.Option(
    FLOW_CAP,
    "--flow-cap",
    min=1,
    metavar="N",
    help="Flows held with their own destination (about 450 bytes each); past N, new destinations are held "
    "as /24 (IPv6 /64) networks, past 1.5 N as /16 (/48), past 2 N only counted. The rules' header says so.",
)
COMMAND_ARGUMENT = typer.Argument(
    None,
    metavar="[-- CMD ARGS...]",
    help="Run CMD (as the sudo user) in a cgroup of its own, record only its connections and its "
    "descendants', stop when it exits, and exit with its status. Its stdout goes to stderr.",
    show_default=False,
)


@app.command(epilog=TRACE_EPILOG)
def trace(
    duration: str | None = typer.Option(None, "--duration", "-t", help="Stop after this long: 60, 90s, 5m, 1h."),
    count: int | None = typer.Option(None, "--count", "-C", min=1, help="Stop after N connections."),
    inputs: list[str] = typer.Option([], "--input", "-i", help="Input plugin (repeatable); default ebpf."),
    outputs: list[str] = typer.Option([], "--output", "-o", help="Output plugin (repeatable); default iptables."),
    input_options: list[str] = typer.Option([], "--input-option", "-I", help="plugin:key:value for an input."),
    output_options: list[str] = typer.Option([], "--output-option", "-O", help="plugin:key:value for an output."),
    no_live: bool = typer.Option(False, "--no-live", help="One line per new flow on stderr instead of the live table."),
    summary_every: str | None = SUMMARY_EVERY_OPTION,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    no_lineage: bool = NO_LINEAGE_OPTION,
    baselines: list[str] = BASELINE_OPTION,
    raw_cmdlines: bool = typer.Option(False, "--raw-cmdlines", help=RAW_CMDLINES_HELP),
    snapshot_every: str | None = SNAPSHOT_EVERY_OPTION,
    resume: list[str] = RESUME_OPTION,
    flow_cap: int = FLOW_CAP_OPTION,
    command: list[str] = COMMAND_ARGUMENT,
) -> None:
    """Watch new outbound connections; print the rules that allow them on exit."""
    from egress_auditor.trace_setup import TraceOptions, build_trace_run

    show_warnings(debug)
    options = TraceOptions(
        duration=optional_duration(duration),
        snapshot_every=optional_duration(snapshot_every),
        summary_every=optional_duration(summary_every),
        inputs=select("input", inputs, input_options, default="ebpf"),
        outputs=select("output", outputs, output_options, default="iptables"),
        count=count,
        live=not no_live,
        lineage=not no_lineage,
        baselines=baselines,
        redact=not raw_cmdlines,
        resume=resume,
        flow_cap=flow_cap,
        command=command or [],
    )
    with build_trace_run(options) as run:
        status = run.run()
    raise typer.Exit(status)


RULES_EPILOG = """Examples:\n
  egress-auditor rules --from web-1.jsonl --from web-2.jsonl -o nftables > egress.nft\n
  egress-auditor rules --from flows.jsonl -O iptables:format:restore -O iptables:policy:drop > rules.v4\n
  egress-auditor rules --from web-1.jsonl --from web-2.jsonl --from web-3.jsonl --min-hosts 2 -O iptables:verbose:1\n
  logcli query --output raw '{job="egress-auditor"}' | egress-auditor rules --from - -o nftables"""


@app.command(epilog=RULES_EPILOG)
def rules(
    sources: list[str] = typer.Option(
        [], "--from", "-f", help="A capture written by -o json (or its lines from Loki); repeatable; - is stdin."
    ),
    outputs: list[str] = typer.Option([], "--output", "-o", help="Output plugin (repeatable); default iptables."),
    output_options: list[str] = typer.Option([], "--output-option", "-O", help="plugin:key:value for an output."),
    min_hosts: int = typer.Option(
        1, "--min-hosts", min=1, help="Keep only rules seen on at least N hosts; list the others in the header."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    raw_cmdlines: bool = typer.Option(False, "--raw-cmdlines", help=RAW_CMDLINES_HELP),
) -> None:
    """Write the rules for saved captures, merging hosts and runs; needs no kernel access."""
    from egress_auditor.capture.reader import read_captures
    from egress_auditor.rules.review import keep_seen_on

    if not sources:
        raise UsageError("rules needs at least one --from FILE: a capture written by trace -o json")
    # Outputs that stream each run's records (json, loki) have no rules to rebuild.
    firewalls = {n: p for n, p in registered("output").items() if not getattr(p.factory, "per_run", False)}
    output_sel = select("output", outputs, output_options, default="iptables", available=firewalls)
    capture = read_captures(sources, redact=not raw_cmdlines)
    for note in capture.notes:
        print(f"egress-auditor: {note}", file=sys.stderr)
    flows, left_out = keep_seen_on(capture.flows, min_hosts)
    if left_out:
        capture.summary.notes.extend(left_out)
        print(f"egress-auditor: {left_out[0].rstrip(':')}, listed in the header", file=sys.stderr)
    texts = [output.finish(flows, capture.summary) for output in output_sel.create()]
    sys.stdout.write("".join(texts))
    sys.stdout.flush()
    print(
        f"egress-auditor: {len(capture.flows)} flows from {capture.runs} run(s) on {capture.summary.host}",
        file=sys.stderr,
    )


DIFF_EPILOG = """Examples:\n
  egress-auditor diff last-week.jsonl this-week.jsonl\n
  egress-auditor diff --old web-1.jsonl --old web-2.jsonl --new web-1-today.jsonl --json\n
  egress-auditor diff --exit-code baseline.jsonl new.jsonl || echo "the policy would change"\n"""


@app.command("diff", epilog=DIFF_EPILOG)
def diff_command(
    files: list[str] = typer.Argument(None, metavar="[OLD.jsonl NEW.jsonl]", show_default=False),
    old: list[str] = typer.Option([], "--old", help="A capture of the old side (repeatable); - is stdin."),
    new: list[str] = typer.Option([], "--new", help="A capture of the new side (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
    exit_code: bool = typer.Option(False, "--exit-code", help="Exit with 3 when a destination was added or is gone."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    """Destinations added and gone between two sets of captures, with their evidence."""
    from egress_auditor.capture.diff import render_json, render_text
    from egress_auditor.capture.reader import read_captures

    if files and not old and not new and len(files) == 2:
        old, new = [files[0]], [files[1]]
    elif files or not old or not new:
        raise UsageError("diff takes OLD.jsonl NEW.jsonl, or --old FILE --new FILE (each repeatable), not both")
    before, after = read_captures(old, evidence=True), read_captures(new, evidence=True)
    for note in before.notes + after.notes:
        print(f"egress-auditor: {note}", file=sys.stderr)
    changes = (render_json if as_json else render_text)(before, after)
    sys.stdout.write(changes.text)
    sys.stdout.flush()
    if exit_code and changes.diff.changed:
        raise typer.Exit(3)


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


@app.command("doctor")
def doctor_command() -> None:
    """Show what this host offers and lacks for egress-auditor, with fixes."""
    results = doctor.checks()
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
    """Flags without a subcommand (`egress-auditor -i ebpf ...`) mean trace, so flag-only command lines keep working."""
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
