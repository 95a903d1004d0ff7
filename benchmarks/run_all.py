"""Every benchmark scenario against trio_stomp's broker and RabbitMQ, side by side.

This script owns the benchmark run of issue 8: it starts ``python -m trio_stomp.broker``
and a private RabbitMQ node (``tests/_rabbitmq.py::run_rabbitmq``: its own ports, data dir
and raised open-files limit, stopped at the end), runs the six rows and the scaling curves
against both with ``benchmarks/loadgen.py`` (interleaved, so both see the same machine), and
writes ``latest.md`` (the table with the ratio trio_stomp / RabbitMQ per row, machine info,
date, command), ``latest.json`` and ``scaling.png`` to the results directory. The previous
``latest.json`` becomes ``previous.json`` and every row that got more than 20% worse is
flagged (printed and written in the table); this is a guard for humans, it never fails.

Where RabbitMQ is not installed it says how to install it and benchmarks trio_stomp alone.
It never fails on speed: the exit status is 1 only when a scenario lost, duplicated or
reordered a message (or errored), because then the figures mean nothing.

    python benchmarks/run_all.py            # full run, results in benchmarks/results/
    python benchmarks/run_all.py --quick    # a smoke run of under two minutes, results in /tmp
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from loadgen import Result, Target  # noqa: E402

#: A row is flagged when it is this much worse than the previous recorded run.
REGRESSION = 0.20

INSTALL_HINT = (
    "RabbitMQ is not installed: benchmarking trio_stomp alone. To compare, install Debian's "
    "broker (its STOMP plugin ships with it): sudo apt-get install rabbitmq-server "
    "(or run .ci/install-system-deps.sh); the script starts a private node on its own ports."
)


def _load_rabbitmq_module() -> ModuleType:
    path = ROOT / "tests" / "_rabbitmq.py"
    spec = importlib.util.spec_from_file_location("_bench_rabbitmq", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Row:
    """One row of the issue's table, with what the field measured and our targets."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    field_rabbitmq: float  # RabbitMQ 3.10 with a Go load generator (issue 8)
    go_broker: float | None  # the Go broker we re-imagine
    target: float  # go-stomp's row: the target


ROWS = (
    Row("queue_auto", "queue, 1 → 1, ack auto", "msgs/s", True, 10_600, 31_300, 100_000),
    Row(
        "queue_ack",
        "queue, 1 → 1, ACK per message (client-individual)",
        "msgs/s",
        True,
        9_100,
        None,
        60_000,
    ),
    Row("queue_ack_4x4", "queue, 4 → 4, client-individual", "msgs/s", True, 8_600, None, 60_000),
    Row(
        "topic_1x10",
        "topic, 1 → 10 subscribers",
        "deliveries/s",
        True,
        13_800,
        101_300,
        177_000,
    ),
    Row("request_reply", "request/reply round trip p50", "ms", False, 0.43, 0.27, 0.20),
    Row(
        "idle",
        "idle connections, 10 s heart-beats: RSS per connection",
        "KiB",
        False,
        149,
        28,
        12,
    ),
)


@dataclass(frozen=True)
class Plan:
    """Counts for one run."""

    queue: int
    topic: int
    round_trips: int
    idle_steps: tuple[int, ...]
    idle_hold_s: float
    subscriber_steps: tuple[int, ...]
    subscriber_deliveries: int
    body_sizes: tuple[int, ...]
    body_bytes: int
    repeats: int


FULL = Plan(
    queue=100_000,
    topic=200_000,
    round_trips=5_000,
    idle_steps=(100, 1_000, 3_000, 10_000),
    idle_hold_s=12.0,
    subscriber_steps=(1, 10, 100, 1_000),
    subscriber_deliveries=100_000,
    body_sizes=(100, 1_024, 10_240, 102_400, 1_048_576),
    body_bytes=200 * 1024 * 1024,
    repeats=3,
)
QUICK = Plan(
    queue=5_000,
    topic=20_000,
    round_trips=300,
    idle_steps=(100, 500),
    idle_hold_s=1.0,
    subscriber_steps=(1, 10, 100),
    subscriber_deliveries=10_000,
    body_sizes=(100, 10_240, 1_048_576),
    body_bytes=20 * 1024 * 1024,
    repeats=1,
)


def _row_runner(key: str, plan: Plan) -> Callable[[Target], Result]:
    if key == "queue_auto":
        return lambda t: loadgen.run_throughput(t, key, kind="queue", count=plan.queue)
    if key == "queue_ack":
        return lambda t: loadgen.run_throughput(
            t, key, kind="queue", count=plan.queue, ack="client-individual"
        )
    if key == "queue_ack_4x4":
        return lambda t: loadgen.run_throughput(
            t,
            key,
            kind="queue",
            producers=4,
            subscriptions=4,
            count=plan.queue // 4,
            ack="client-individual",
        )
    if key == "topic_1x10":
        return lambda t: loadgen.run_throughput(
            t, key, kind="topic", subscriptions=10, count=plan.topic // 10, window=2000
        )
    if key == "request_reply":
        return lambda t: loadgen.run_request_reply(t, count=plan.round_trips)
    raise ValueError(key)


def _median_result(results: list[Result], higher_is_better: bool) -> Result:
    """The run with the median figure; every run's figure goes into ``extra['runs']``."""
    ordered = sorted(results, key=lambda r: r.value, reverse=higher_is_better)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.extra["runs"] = [r.value for r in results]
    # A check failure in any repeat counts.
    for r in results:
        if r is not chosen and not r.ok:
            chosen.errors.append(
                f"another repeat failed: lost={r.lost} dup={r.duplicates} "
                f"reordered={r.reordered} {r.errors[:2]}"
            )
    return chosen


# -- the brokers ----------------------------------------------------------------------------


def _find_beam(base: pathlib.Path) -> int:
    """PID of the Erlang VM whose home is ``base`` (the process that does the work; the
    node name is not on its command line, the home directory is)."""
    short = str(base.resolve()).encode()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"beam" in cmdline.split(b"\0")[0] and short in cmdline:
            return int(entry.name)
    raise RuntimeError(f"no beam.smp process with home {base}")


@contextlib.contextmanager
def _rabbitmq(base: pathlib.Path) -> Iterator[Target | None]:
    try:
        module = _load_rabbitmq_module()
    except Exception as exc:  # the fixture module itself is broken or missing
        print(f"cannot load tests/_rabbitmq.py ({exc}): benchmarking trio_stomp alone")
        yield None
        return
    if module.find_rabbitmq_server() is None:
        print(INSTALL_HINT)
        yield None
        return
    print("starting a private RabbitMQ node ...", flush=True)
    with module.run_rabbitmq(base) as node:
        pid = _find_beam(base)
        yield Target("RabbitMQ", "rabbitmq", node.stomp_port, pid)


# -- reporting ------------------------------------------------------------------------------


def _machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    rabbit = ""
    if shutil.which("dpkg-query"):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"],
            capture_output=True,
            text=True,
            check=False,
        )
        rabbit = out.stdout.strip()
    import trio

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "rabbitmq": rabbit or "not installed",
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit == "ms":
        return f"{value:.3f}"
    if unit == "KiB":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _ratio(ours: float | None, theirs: float | None, higher: bool) -> str:
    if not ours or not theirs or ours != ours or theirs != theirs:
        return "n/a"
    ratio = ours / theirs if higher else theirs / ours
    return f"{ratio:.2f}x"


def _targets(row: Row, ours: float | None, rabbit: float | None) -> tuple[str, str]:
    """(floor met?, target met?) for one row."""
    if ours is None or ours != ours:
        return "n/a", "n/a"
    reference = rabbit if rabbit else row.field_rabbitmq
    if row.higher_is_better:
        floor = max(2 * reference, row.go_broker or 0)
        return (
            ("yes" if ours >= floor else f"no (needs {floor:,.0f})"),
            ("yes" if ours >= row.target else "no"),
        )
    floor = min(reference / 2, row.go_broker or float("inf"))
    return (
        ("yes" if ours <= floor else f"no (needs ≤ {floor:.3g})"),
        ("yes" if ours <= row.target else "no"),
    )


def _regressions(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    flags = []
    for row in ROWS:
        for broker in ("trio_stomp", "RabbitMQ"):
            old = previous.get("rows", {}).get(row.key, {}).get(broker, {}).get("value")
            new = current.get("rows", {}).get(row.key, {}).get(broker, {}).get("value")
            if not old or not new:
                continue
            worse = (old - new) / old if row.higher_is_better else (new - old) / old
            if worse > REGRESSION:
                flags.append(
                    f"{broker} {row.title}: {_fmt(old, row.unit)} → {_fmt(new, row.unit)} "
                    f"{row.unit} ({100 * worse:.0f}% worse)"
                )
    return flags


def _detail_line(r: dict[str, Any]) -> str:
    wall = r["wall_s"] or 1e-9
    check = (
        "OK"
        if r["ok"]
        else f"**FAILED** lost {r['lost']}, dup {r['duplicates']}, reordered {r['reordered']}"
        + (f", {r['errors'][:2]}" if r["errors"] else "")
    )
    extra = ""
    if r["scenario"] == "request_reply":
        e = r["extra"]
        extra = f" p50 {e['p50_ms']:.3f} / p99 {e['p99_ms']:.3f} ms, {e['round_trips']} trips;"
    elif r["scenario"] == "idle_connections":
        extra = f" {r['expected']} connections held {r['extra'].get('hold_s', 0):.0f} s;"
    elif "runs" in r["extra"]:
        extra = " runs " + ", ".join(f"{v:,.0f}" for v in r["extra"]["runs"]) + ";"
    return (
        f"| {r['broker']} | {r['scenario']} |{extra} {r['delivered']:,} delivered | "
        f"{r['wall_s']:.2f} | {r['broker_cpu_s']:.2f} ({100 * r['broker_cpu_s'] / wall:.0f}%) | "
        f"{100 * r.get('broker_wait_s', 0.0) / wall:.0f}% | "
        f"{r['loadgen_cpu_s']:.2f} ({100 * r['loadgen_cpu_s'] / wall:.0f}%) | "
        f"{r['broker_us_per_message']:.1f} | {r['broker_peak_rss_kib'] / 1024:.0f} | {check} |"
    )


def _markdown(data: dict[str, Any], flags: list[str]) -> str:
    m = data["machine"]
    lines = [
        "# trio_stomp beside RabbitMQ",
        "",
        f"Measured {data['date']} with `{data['command']}` "
        f"({'quick smoke run: counts too small to quote' if data['quick'] else 'full run'}).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}, "
        f"Python {m['python']}, trio {m['trio']}, RabbitMQ {m['rabbitmq']} (STOMP plugin). "
        f"Load average before the run: {m['load_before']}. Broker and load generator share "
        "the cores; loopback TCP; 100-byte bodies; the load generator is "
        "`benchmarks/loadgen.py` (raw sockets, no trio_stomp code, producers and consumers "
        "in separate processes). Throughput rows are the median of "
        f"{data['repeats']} run(s), each run interleaved between the two brokers. "
        f"trio_stomp ran as `{data.get('broker_command', '')}`; RabbitMQ as a private node "
        "with its defaults (prefetch-count 1000 for client-individual, as trio_stomp's "
        "default prefetch).",
        "",
        "| scenario | trio_stomp | RabbitMQ | trio_stomp / RabbitMQ | floor met | "
        "target met (go-stomp's row) | field: RabbitMQ / Go broker / target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        cells = data["rows"].get(row.key, {})
        ours = cells.get("trio_stomp", {}).get("value")
        theirs = cells.get("RabbitMQ", {}).get("value")
        floor, target = _targets(row, ours, theirs)
        extra = ""
        if row.key == "request_reply":
            e_o = cells.get("trio_stomp", {}).get("extra", {})
            e_r = cells.get("RabbitMQ", {}).get("extra", {})
            ours_s = f"{e_o['p50_ms']:.3f} / {e_o['p99_ms']:.3f}" if e_o else "n/a"
            theirs_s = f"{e_r['p50_ms']:.3f} / {e_r['p99_ms']:.3f}" if e_r else "n/a"
            title = "request/reply round trip p50 / p99 (ms)"
        else:
            ours_s = _fmt(ours, row.unit) if ours is not None else "n/a"
            theirs_s = _fmt(theirs, row.unit) if theirs is not None else "n/a"
            title = f"{row.title} ({row.unit})"
            if row.key == "idle":
                n = cells.get("trio_stomp", {}).get("expected")
                title = f"{row.title} at {n:,} connections (KiB)" if n else title
        for cell in cells.values():
            if not cell.get("ok", True):
                extra = " ⚠ check failed"
        go = _fmt(row.go_broker, row.unit) if row.go_broker else "-"
        lines.append(
            f"| {title}{extra} | {ours_s} | {theirs_s} | "
            f"{_ratio(ours, theirs, row.higher_is_better)} | {floor} | {target} | "
            f"{_fmt(row.field_rabbitmq, row.unit)} / {go} / {_fmt(row.target, row.unit)} |"
        )
    lines += [
        "",
        "Ratios are better-is-higher (for the round trip and memory rows, RabbitMQ's figure "
        "divided by ours). Floor: at least 2x RabbitMQ measured here (half its latency and "
        "memory) and at least the Go broker of issue 8; target: go-stomp's row of issue 8.",
        "",
        "## Scaling curves",
        "",
        "![scaling curves](scaling.png)",
        "",
    ]
    for curve_key, title, unit in (
        ("subscribers", "topic deliveries/s by number of subscribers", "deliveries/s"),
        ("body_size", "queue 1 → 1 (auto) by body size", "msgs/s (MB/s)"),
        ("idle", "broker RSS by idle connections", "KiB per connection (total MiB)"),
    ):
        lines += [
            f"### {title}",
            "",
            f"| x | trio_stomp {unit} | RabbitMQ {unit} |",
            "|---|---|---|",
        ]
        curves = data["curves"].get(curve_key, {})
        xs = sorted({pt["x"] for pts in curves.values() for pt in pts})
        for x in xs:
            cells = []
            for broker in ("trio_stomp", "RabbitMQ"):
                pt = next((p for p in curves.get(broker, []) if p["x"] == x), None)
                if pt is None:
                    cells.append("n/a")
                elif curve_key == "body_size":
                    cells.append(f"{pt['y']:,.0f} ({pt['mb_s']:,.1f} MB/s){_bad(pt)}")
                elif curve_key == "idle":
                    cells.append(f"{pt['y']:.1f} ({pt['rss_mib']:.0f} MiB){_bad(pt)}")
                else:
                    cells.append(f"{pt['y']:,.0f}{_bad(pt)}")
            lines.append(f"| {x:,} | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines += [
        "## Who was the limit",
        "",
        "CPU seconds over the measured interval (percent of wall time; 100% = one core). "
        "The broker figure is the broker process (for RabbitMQ the Erlang VM, all threads); "
        "the load generator figure is all its worker processes plus its main process. "
        "'Waited for a core' is the time the broker was runnable but another process had the "
        "core (/proc/PID/task/*/schedstat): CPU plus wait near 100% means the broker was the "
        "limit, and a large wait means the machine was busy with other work. Broker CPU per "
        "message hardly depends on that load, so it is the figure to compare across runs.",
        "",
        "| broker | scenario | figures | wall (s) | broker CPU s | broker waited for a core | "
        "loadgen CPU s | broker CPU µs per message | broker peak RSS (MiB) | "
        "exactly-once, in order |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["details"]:
        lines.append(_detail_line(r))
    lines += ["", "## Regression guard", ""]
    if data.get("previous_date"):
        lines.append(
            f"Compared with the previous run ({data['previous_date']}): "
            + ("no row is more than 20% worse." if not flags else "**rows more than 20% worse:**")
        )
        lines += [f"- {f}" for f in flags]
    else:
        lines.append("No previous run recorded.")
    lines.append("")
    return "\n".join(lines)


def _bad(pt: dict[str, Any]) -> str:
    return "" if pt.get("ok", True) else " ⚠"


def _plot(data: dict[str, Any], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    styles = {"trio_stomp": ("tab:blue", "o"), "RabbitMQ": ("tab:orange", "s")}
    panels = (
        ("subscribers", "topic subscribers", "deliveries / s", "y"),
        ("body_size", "body size (bytes)", "MB / s (queue 1 → 1, auto)", "mb_s"),
        ("idle", "idle connections (10 s heart-beats)", "broker RSS (MiB)", "rss_mib"),
    )
    for ax, (key, xlabel, ylabel, field) in zip(axes, panels, strict=True):
        for broker, points in data["curves"].get(key, {}).items():
            color, marker = styles.get(broker, ("gray", "x"))
            xs = [p["x"] for p in points]
            ys = [p[field] for p in points]
            ax.plot(xs, ys, marker=marker, color=color, label=broker)
        ax.set_xscale("log")
        if key != "idle":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"trio_stomp beside RabbitMQ ({data['date']}, {data['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run ---------------------------------------------------------------------------------


def _record(data: dict[str, Any], r: Result) -> None:
    data["details"].append(r.as_dict())
    print(r.summary(), flush=True)


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})
    out = (
        pathlib.Path(args.out)
        if args.out
        else (
            pathlib.Path(tempfile.gettempdir()) / "trio_stomp_bench_quick"
            if args.quick
            else HERE / "results"
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    loadgen.self_test()  # the splitter every check relies on
    old, new = loadgen.raise_nofile_limit()
    print(f"open-files limit of the load generator: {old} → {new}")
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/run_all.py " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "broker_command": "python -m trio_stomp.broker --listen tcp://127.0.0.1:0 "
        + " ".join(("--log-level", "WARNING", *loadgen.BENCH_BROKER_ARGS)),
        "repeats": plan.repeats,
        "machine": _machine(),
        "rows": {},
        "curves": {},
        "details": [],
    }
    only = set(args.only or [])
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        targets: list[Target] = [
            stack.enter_context(loadgen.start_trio_stomp_broker(log_path=str(tmp / "broker.log")))
        ]
        if not args.no_rabbitmq:
            rabbit = stack.enter_context(_rabbitmq(tmp / "rabbitmq"))
            if rabbit is not None:
                targets.append(rabbit)
        print(f"brokers: {', '.join(f'{t.label} on port {t.port}' for t in targets)}")

        # The six rows, interleaved per repeat.
        for row in ROWS:
            if row.key == "idle" or (only and row.key not in only):
                continue
            runner = _row_runner(row.key, plan)
            per_broker: dict[str, list[Result]] = {t.label: [] for t in targets}
            for _ in range(plan.repeats):
                for target in targets:
                    r = runner(target)
                    print(r.summary(), flush=True)
                    per_broker[target.label].append(r)
            for label, results in per_broker.items():
                chosen = _median_result(results, row.higher_is_better)
                data["rows"].setdefault(row.key, {})[label] = chosen.as_dict()
                data["details"].append(chosen.as_dict())

        # Scaling: topic subscribers and body sizes.
        if not only or "subscribers" in only:
            for subs in plan.subscriber_steps:
                for target in targets:
                    count = max(50, plan.subscriber_deliveries // subs)
                    r = loadgen.run_throughput(
                        target,
                        f"topic_1x{subs}",
                        kind="topic",
                        subscriptions=subs,
                        count=count,
                        window=min(2000, max(100, 400_000 // subs)),
                    )
                    _record(data, r)
                    data["curves"].setdefault("subscribers", {}).setdefault(
                        target.label, []
                    ).append({"x": subs, "y": r.value, "ok": r.ok})
        if not only or "body_size" in only:
            for size in plan.body_sizes:
                for target in targets:
                    count = max(100, min(plan.queue, plan.body_bytes // size))
                    r = loadgen.run_throughput(
                        target, f"queue_auto_{size}B", kind="queue", count=count, body_size=size
                    )
                    _record(data, r)
                    data["curves"].setdefault("body_size", {}).setdefault(target.label, []).append(
                        {"x": size, "y": r.value, "mb_s": r.extra["mb_per_s"], "ok": r.ok}
                    )

        # Idle connections: a fresh trio_stomp broker (RSS not inflated by earlier runs);
        # RabbitMQ's node is reused (restarting it costs ~10 s and resets nothing we count).
        if not only or "idle" in only:
            idle_targets: list[tuple[Target, contextlib.AbstractContextManager[Target] | None]]
            idle_targets = [
                (t, loadgen.start_trio_stomp_broker(log_path=str(tmp / "broker-idle.log")))
                if t.flavour == "trio_stomp"
                else (t, None)
                for t in targets
            ]
            for target, fresh in idle_targets:
                with fresh if fresh is not None else contextlib.nullcontext(target) as t:
                    r, curve = loadgen.run_idle(t, steps=plan.idle_steps, hold_s=plan.idle_hold_s)
                r.broker = target.label
                _record(data, r)
                data["rows"].setdefault("idle", {})[target.label] = r.as_dict()
                data["curves"].setdefault("idle", {})[target.label] = [
                    {
                        "x": int(p["connections"]),
                        "y": p["kib_per_connection"],
                        "rss_mib": p.get("rss_kib_after_hold", p["rss_kib"]) / 1024,
                        "ok": r.ok,
                    }
                    for p in curve
                ]
    data["duration_s"] = round(time.monotonic() - t_start, 1)

    latest = out / "latest.json"
    previous: dict[str, Any] = {}
    if latest.exists():
        with contextlib.suppress(ValueError):
            previous = json.loads(latest.read_text())
        shutil.copyfile(latest, out / "previous.json")
    flags = _regressions(previous, data) if previous else []
    data["previous_date"] = previous.get("date")
    data["regressions"] = flags
    latest.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    (out / "latest.md").write_text(_markdown(data, flags))
    _plot(data, out / "scaling.png")
    print()
    print((out / "latest.md").read_text())
    if flags:
        print("REGRESSION GUARD: rows more than 20% worse than the previous run:")
        for f in flags:
            print("  " + f)
    print(f"wrote {out / 'latest.md'}, {latest}, {out / 'scaling.png'}")
    failed = [d for d in data["details"] if not d["ok"]]
    for d in failed:
        print(
            f"CHECK FAILED: {d['broker']} {d['scenario']}: lost {d['lost']}, "
            f"dup {d['duplicates']}, reordered {d['reordered']}, {d['errors'][:3]}"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--repeats", type=int, help="runs per row (median is kept)")
    parser.add_argument("--out", help="results directory")
    parser.add_argument("--no-rabbitmq", action="store_true", help="benchmark trio_stomp only")
    parser.add_argument(
        "--only",
        action="append",
        choices=[r.key for r in ROWS] + ["subscribers", "body_size"],
        help="run only these rows/curves (repeatable)",
    )
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
