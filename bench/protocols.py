"""Protocol benchmark: binary, compact, THeader and TLS rows beside each other, interleaved.

Usage (from the repository root, with the project's environment):

    python bench/protocols.py            # 5 rounds x 3 s per row
    python bench/protocols.py --quick    # 2 rounds x 1 s, to check the harness

Every row is 16 client connections, 64 B payloads, closed loop, and gives
calls/s, p50/p99 and the proxy's CPU per call (user+system from /proc,
divided by every good reply of the run). Rows:

- binary framed: direct, HAProxy (TCP mode), sidecar: the baseline, as in
  `run.py`;
- compact framed: direct, the sidecar with a compact upstream
  (``upstream.protocol: same``) and the sidecar transcoding (compact
  clients, ``upstream.protocol: binary``, binary upstream): the difference
  of the last two is what transcoding costs per call;
- THeader (binary inside): direct, sidecar;
- TLS on both sides (client to proxy and proxy to upstream): direct (TLS
  to the upstream), HAProxy (``bind ... ssl crt``, ``server ... ssl
  ca-file``) and the sidecar (``tls`` and ``upstream.tls``).

Each C upstream accepts only what its row must deliver to it
(``--protocol``/``--transport``), so a proxy that sent something else
would show up as errors. Certificates (a CA and a certificate for
127.0.0.1 signed by it) are made with trustme in a temporary directory.
Rounds are interleaved, the rows' order rotating from round to round;
figures are medians over rounds, differences are taken within a round.
Every process is ended by its PID.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from benchtools import (
    HOST,
    START_TIMEOUT,
    build_tools,
    cpu_times,
    explain_failure,
    free_port,
    loadavg,
    machine_busy_seconds,
    read_line,
    round_defaults,
    round_meta,
    round_parser,
    save_results,
    sidecar_process,
    stop_process,
    wait_for_port,
)

HAPROXY = "/usr/sbin/haproxy"
CONNS, PAYLOAD = 16, 64

HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 4096
    tune.bufsize 65536

defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m

frontend bench
    bind {host}:{port}{bind_tls}
    default_backend upstream

backend upstream
    server up {host}:{upstream_port}{server_tls}
"""

# Upstreams by name: what each accepts (C upstream flags).
UPSTREAMS = {
    "binary": ["--protocol", "binary", "--transport", "framed"],
    "compact": ["--protocol", "compact", "--transport", "framed"],
    "theader": ["--protocol", "binary", "--transport", "theader"],
    "tls": ["--protocol", "binary", "--transport", "framed", "--tls"],
}


@dataclass(frozen=True)
class Row:
    """One measured row: a client shape, the target it drives, the upstream behind it."""

    group: str  # "binary framed", "compact framed", "THeader", "TLS"
    target: str  # "direct", "haproxy", "sidecar", "sidecar transcoding"
    upstream: str  # key of UPSTREAMS
    proxy: str | None  # key of the running proxies; None: straight to the upstream
    protocol: str = "binary"
    transport: str = "framed"
    tls: bool = False

    @property
    def label(self) -> str:
        return f"{self.group} / {self.target}"


ROWS = (
    Row("binary framed", "direct", "binary", None),
    Row("binary framed", "haproxy", "binary", "haproxy"),
    Row("binary framed", "sidecar", "binary", "sidecar"),
    Row("compact framed", "direct", "compact", None, "compact"),
    Row("compact framed", "sidecar", "compact", "sidecar-compact", "compact"),
    Row("compact framed", "sidecar transcoding", "binary", "sidecar-transcode", "compact"),
    Row("THeader", "direct", "theader", None, transport="theader"),
    Row("THeader", "sidecar", "theader", "sidecar-theader", transport="theader"),
    Row("TLS", "direct", "tls", None, tls=True),
    Row("TLS", "haproxy", "tls", "haproxy-tls", tls=True),
    Row("TLS", "sidecar", "tls", "sidecar-tls", tls=True),
)

# Sidecar variants: the config file's text (paths relative to it).
SIDECARS = {
    "sidecar": ("binary", ""),
    "sidecar-compact": ("compact", ""),
    "sidecar-transcode": ("binary", "upstream:\n  protocol: binary\n"),
    "sidecar-theader": ("theader", ""),
    "sidecar-tls": (
        "tls",
        "tls:\n  cert: server.crt\n  key: server.key\nupstream:\n  tls:\n    ca: ca.crt\n",
    ),
}


def make_certs(workdir: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in ``workdir``."""
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    files = {
        "ca": workdir / "ca.crt",
        "cert": workdir / "server.crt",
        "key": workdir / "server.key",
        "combined": workdir / "server.pem",  # HAProxy wants both in one file
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files["combined"]))
    return files


@contextlib.contextmanager
def upstream(binary: Path, args: list[str], certs: dict[str, Path]) -> Iterator[tuple[int, int]]:
    """A C upstream with ``args``; yields (pid, port) and stops it by PID on exit."""
    command = [str(binary), "--host", HOST, "--port", "0", *args]
    if "--tls" in args:
        command += ["--cert", str(certs["cert"]), "--key", str(certs["key"])]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        word, _, number = read_line(proc, START_TIMEOUT).partition(" ")
        if word != "LISTENING":
            raise RuntimeError(f"upstream said {word!r}")
        yield proc.pid, int(number)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def haproxy(
    workdir: Path, name: str, upstream_port: int, certs: dict[str, Path], tls: bool
) -> Iterator[tuple[int, int]]:
    """HAProxy in TCP mode, TLS on both sides when ``tls``; yields (pid, port)."""
    port = free_port()
    bind_tls = f" ssl crt {certs['combined']}" if tls else ""
    server_tls = f" ssl verify required ca-file {certs['ca']}" if tls else ""
    config = workdir / f"{name}.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(
            host=HOST,
            port=port,
            upstream_port=upstream_port,
            bind_tls=bind_tls,
            server_tls=server_tls,
        )
    )
    log_path = workdir / f"{name}.log"
    with log_path.open("w") as log:
        binary = shutil.which("haproxy") or HAPROXY
        proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log)
        try:
            with explain_failure(log_path):
                wait_for_port(port, proc)
            yield proc.pid, port
        finally:
            stop_process(proc)


def loadgen_args(
    row: Row, port: int, args: Any, certs: dict[str, Path], conns: int = CONNS
) -> list[str]:
    """The load generator's command line for one row (``args``: duration and warmup)."""
    command = ["--host", HOST, "--port", str(port), "--conns", str(conns)]
    command += ["--payload", str(PAYLOAD), "--protocol", row.protocol]
    command += ["--transport", row.transport, "--duration", str(args.duration)]
    command += ["--warmup", str(args.warmup)]
    if row.tls:
        command += ["--tls", "--ca", str(certs["ca"])]
    return command


def run_loadgen_argv(binary: Path, argv: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """Run the load generator with ``argv`` (`loadgen_args`); returns its JSON report.

    Raises:
        RuntimeError: it exited non-zero (its stderr is in the message).
        subprocess.TimeoutExpired: it ran past ``timeout`` seconds (it was killed).
    """
    result = subprocess.run(
        [str(binary), *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"loadgen exited {result.returncode}: {result.stderr.strip()}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def measure(row: Row, binary: Path, watch: dict[str, int], argv: list[str]) -> dict[str, Any]:
    """One load generator run, with the CPU of the ``watch`` processes around it."""
    before = {name: cpu_times(pid) for name, pid in watch.items()}
    busy0 = machine_busy_seconds()
    report = run_loadgen_argv(binary, argv)
    busy = machine_busy_seconds() - busy0
    after = {name: cpu_times(pid) for name, pid in watch.items()}
    calls = max(int(report["calls_all"]), 1)
    cpu = {name: sum(after[name]) - sum(before[name]) for name in watch}
    proxy = cpu.get("proxy")
    ours = sum(cpu.values()) + report["cpu_s"]
    return {
        "group": row.group,
        "target": row.target,
        "calls_per_s": report["calls_per_s"],
        "p50_us": report["latency_us"]["p50"],
        "p99_us": report["latency_us"]["p99"],
        "errors": report["errors"],
        "proxy_cpu_per_call_us": proxy / calls * 1e6 if proxy is not None else None,
        "upstream_cpu_per_call_us": cpu["upstream"] / calls * 1e6,
        "others_core_share": max(busy - ours, 0.0) / float(report["wall_s"]),
        "loadgen": report,
    }


def median(values: list[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per row, and the per-round differences the reading is about."""
    rows: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        mine = [r for r in runs if r["group"] == row.group and r["target"] == row.target]
        rows[row.label] = {
            key: median([r[key] for r in mine])
            for key in ("calls_per_s", "p50_us", "p99_us", "proxy_cpu_per_call_us")
        }
        rows[row.label]["errors"] = sum(r["errors"] for r in mine)

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of CPU/call of row a minus row b (labels)."""
        diffs = []
        for rnd in sorted({r["round"] for r in runs}):
            cpu = {
                f"{r['group']} / {r['target']}": r["proxy_cpu_per_call_us"]
                for r in runs
                if r["round"] == rnd
            }
            if cpu.get(a) is not None and cpu.get(b) is not None:
                diffs.append(cpu[a] - cpu[b])
        return median(diffs)

    deltas = {
        "transcoding (transcoding - compact same)": paired(
            "compact framed / sidecar transcoding", "compact framed / sidecar"
        ),
        "compact same - binary (sidecar)": paired(
            "compact framed / sidecar", "binary framed / sidecar"
        ),
        "THeader - binary framed (sidecar)": paired("THeader / sidecar", "binary framed / sidecar"),
        "TLS - plaintext (sidecar)": paired("TLS / sidecar", "binary framed / sidecar"),
        "TLS - plaintext (haproxy)": paired("TLS / haproxy", "binary framed / haproxy"),
    }
    others = median([r["others_core_share"] for r in runs])
    return {"rows": rows, "cpu_deltas_us": deltas, "others_core_share": others}


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The table and the CPU differences, as markdown."""
    lines = [
        f"Protocols: {CONNS} connections, {PAYLOAD} B, closed loop; medians of "
        f"{meta['rounds']} interleaved rounds x {meta['duration_s']:g} s; load average "
        f"{meta['loadavg_before']} before, {meta['loadavg_after']} after; the rest of the "
        f"machine used {fmt(summary['others_core_share'], 2)} of a core during a run (median).",
        "",
        "| protocol / transport | target | calls/s | proxy CPU µs/call "
        "| p50 µs | p99 µs | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        s = summary["rows"][row.label]
        lines.append(
            f"| {row.group} | {row.target} | {fmt(s['calls_per_s'])} "
            f"| {fmt(s['proxy_cpu_per_call_us'], 1)} | {fmt(s['p50_us'])} "
            f"| {fmt(s['p99_us'])} | {s['errors']} |"
        )
    lines += [
        "",
        "Proxy CPU per call, differences (median over rounds of the per-round difference):",
        "",
    ]
    lines += [f"- {name}: {fmt(value, 1)} µs" for name, value in summary["cpu_deltas_us"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = round_defaults(round_parser(__doc__.split("\n\n")[0]).parse_args(argv))
    tools = build_tools()
    meta: dict[str, Any] = {**round_meta(args), "loadavg_before": loadavg()}
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-protocols-")))
        certs = make_certs(tmp)
        ups = {
            name: stack.enter_context(upstream(tools["upstream"], flags, certs))
            for name, flags in UPSTREAMS.items()
        }
        proxies: dict[str, tuple[int, int]] = {}
        for name, tls in (("haproxy", False), ("haproxy-tls", True)):
            up_port = ups["tls" if tls else "binary"][1]
            proxies[name] = stack.enter_context(haproxy(tmp, name, up_port, certs, tls))
        for name, (up, text) in SIDECARS.items():
            config = tmp / f"{name}.yaml"
            config.write_text(text or "{}\n")
            program = ["-m", "sidecar", "run", "--config", str(config)]
            sidecar = stack.enter_context(sidecar_process(program, ups[up][1], tmp / f"{name}.log"))
            proxies[name] = (sidecar.proc.pid, sidecar.port)
        total = args.rounds * len(ROWS)
        for rnd in range(args.rounds):
            shift = rnd * 4 % len(ROWS)  # rotate the order between rounds
            for row in ROWS[shift:] + ROWS[:shift]:
                up_pid, up_port = ups[row.upstream]
                watch = {"upstream": up_pid}
                port = up_port
                if row.proxy is not None:
                    watch["proxy"], port = proxies[row.proxy]
                argv_ = loadgen_args(row, port, args, certs)
                run = measure(row, tools["loadgen"], watch, argv_)
                run["round"] = rnd
                runs.append(run)
                cpu = run["proxy_cpu_per_call_us"]
                print(
                    f"[{len(runs)}/{total}] {row.label}: {run['calls_per_s']:,.0f} calls/s, "
                    f"p50 {run['p50_us']:,.0f} µs"
                    + (f", {cpu:.1f} µs CPU/call" if cpu is not None else "")
                    + (f", {run['errors']} ERRORS" if run["errors"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
    meta["loadavg_after"] = loadavg()
    summary = summarize(runs)
    markdown = render(summary, meta)
    print(markdown)
    save_results(
        "protocols",
        args.quick,
        {"meta": meta, "summary": summary, "runs": runs, "markdown": markdown},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
