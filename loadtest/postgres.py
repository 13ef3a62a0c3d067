#!/usr/bin/env python3
"""Figures of the PostgreSQL control plane (driven by loadtest/run-postgres.sh).

A. change-to-visible latency over UPDATES (default 1,000) committed one by one: the proxy's
   own histogram (trigger time in the database to the table the workers read), quantiles
   interpolated within buckets;
B. full load time and RSS with 100,000 and 1,000,000 domains;
C. request logging into proxy_logs at the top rate of loadtest scenario 1: requests/s with
   database logging on and off (interleaved, ROUNDS rounds), CPU per request, log rows written
   per second, rows counted against requests.

Uses a database of its own (created and dropped), psql for setup, the release binaries.
"""

import json
import os
import re
import signal
import statistics
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

# Shared with the proxy comparison (same directory).
from bench import cpu_ticks, log, rss_kib, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
PG = os.environ.get("RINGWAY_PG", "host=127.0.0.1 port=5432 user=postgres")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
UPDATES = int(os.environ.get("UPDATES", "1000"))
SIZES = [int(x) for x in os.environ.get("SIZES", "100000,1000000").split(",") if x]
PROXY_CPUS = os.environ.get("PROXY_CPUS", "0")
LOAD_CPUS = os.environ.get("LOAD_CPUS", "1")
ORIGIN_PORT, PORT_OFF, PORT_ON, ADMIN_OFF, ADMIN_ON = 18500, 18501, 18502, 18591, 18592
CLK_TCK = os.sysconf("SC_CLK_TCK")
DB = f"ringway_loadtest_{os.getpid()}"




def psql(sql, db=DB, quiet=True):
    out = subprocess.run(["psql", f"{PG} dbname={db}", "-v", "ON_ERROR_STOP=1", "-qAtc" if quiet else "-c", sql], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"psql: {out.stderr}")
    return out.stdout.strip()




def metrics(admin):
    return urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()


def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def histogram_quantile(text, name, q):
    """Prometheus-style: linear interpolation inside the bucket holding quantile q."""
    buckets = []
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', line)
        if m and m.group(1) != "+Inf":
            buckets.append((float(m.group(1)), float(m.group(2))))
    count = metric(text, f"{name}_count")
    if not count:
        return None
    want = q * count
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= want:
            frac = (want - prev_n) / (n - prev_n) if n > prev_n else 1.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_n = le, n
    return None






RUNNING = []


class Proc:
    def __init__(self, argv, port, out):
        self.proc = subprocess.Popen(argv, stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.append(self)
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited at start: see {out}")
        wait_port(port, timeout=120.0)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited at start (is port {port} taken?): see {out}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def ringway(work, name, port, admin, logs, extra=""):
    cfg = work / f"{name}.toml"
    cfg.write_text(
        f"""[workers]
count = {len(PROXY_CPUS.split(","))}
pin = true
cores = [{PROXY_CPUS}]
[listen]
http = "127.0.0.1:{port}"
backlog = 4096
[admin]
listen = "127.0.0.1:{admin}"
[routes]
store = "postgres"
[postgres]
url = "{PG} dbname={DB}"
startup_wait_ms = 600000
snapshot_path = "{name}-snapshot.json"
[postgres.logs]
enabled = {"true" if logs else "false"}
spool_dir = "{name}-spool"
{extra}
"""
    )
    return Proc(["taskset", "-c", PROXY_CPUS, str(REL / "ringway"), "serve", "--config", str(cfg)], port, work / f"{name}.out")


def wrk(port):
    out = subprocess.run(["taskset", "-c", LOAD_CPUS, "wrk", "-t1", "-c64", f"-d{DURATION}s", "-H", "Host: a.test", f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errs = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    return reqs, rps, errs


def main():
    work = ROOT / "loadtest" / "results" / "tmp" / f"pg-{datetime.now(timezone.utc).strftime('%Y-%m-%d-%H%M')}"
    work.mkdir(parents=True, exist_ok=True)
    psql(f"CREATE DATABASE {DB}", db="postgres")
    results = {"meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "pg": PG, "rounds": ROUNDS, "duration_s": DURATION}}
    origin = None
    try:
        (work / "migrate.toml").write_text(f'[postgres]\nurl = "{PG} dbname={DB}"\n')
        subprocess.run([str(REL / "ringway"), "migrate", "--config", str(work / "migrate.toml")], check=True, capture_output=True)
        origin = Proc(["taskset", "-c", LOAD_CPUS, str(REL / "ringway-origin"), "--listen", f"127.0.0.1:{ORIGIN_PORT}", "--threads", "1", "--cores", LOAD_CPUS], ORIGIN_PORT, work / "origin.out")
        psql(f"""INSERT INTO projects (id, slug) VALUES (1, 'p1');
                 INSERT INTO environments (id, project_id, name) VALUES (1, 1, 'prod');
                 INSERT INTO deployments (id, project_id, environment_id, upstreams) VALUES (1, 1, 1, '{{127.0.0.1:{ORIGIN_PORT}}}');
                 INSERT INTO domains (hostname, deployment_id) VALUES ('a.test', 1);""")

        # A. change-to-visible.
        log(f"A: {UPDATES} updates, one transaction each")
        rw = ringway(work, "changes", PORT_OFF, ADMIN_OFF, logs=False)
        sql = "".join("UPDATE domains SET redirect_https = NOT redirect_https WHERE hostname = 'a.test'; SELECT pg_sleep(0.005);\n" for _ in range(UPDATES))
        (work / "updates.sql").write_text(sql)
        subprocess.run(["psql", f"{PG} dbname={DB}", "-qAt", "-f", str(work / "updates.sql")], check=True, capture_output=True)
        time.sleep(1)
        m = metrics(ADMIN_OFF)
        name = "ringway_db_change_visible_seconds"
        results["change_visible"] = {
            "updates": UPDATES,
            "observed": metric(m, f"{name}_count"),
            "p50_ms": (histogram_quantile(m, name, 0.50) or 0) * 1000,
            "p99_ms": (histogram_quantile(m, name, 0.99) or 0) * 1000,
            "max_bucket_ms": None,
            "mean_ms": metric(m, f"{name}_sum") / max(metric(m, f"{name}_count"), 1) * 1000,
            "incremental_loads": metric(m, "ringway_db_incremental_loads_total"),
        }
        log(f"  {results['change_visible']}")
        rw.stop()

        # B. full loads.
        results["full_load"] = []
        rw = ringway(work, "empty", PORT_OFF, ADMIN_OFF, logs=False)
        time.sleep(2)
        base = rss_kib([rw.proc.pid])
        rw.stop()
        for n in SIZES:
            have = int(psql("SELECT count(*) FROM domains"))
            log(f"B: {n} domains (inserting {n - have})")
            psql(f"INSERT INTO domains (hostname, deployment_id) SELECT 'h' || g || '.example.test', 1 FROM generate_series({have}, {n - 1}) g")
            t0 = time.time()
            rw2 = ringway(work, f"load{n}", PORT_ON, ADMIN_ON, logs=False)
            while metric(metrics(ADMIN_ON), "ringway_db_full_loads_total") < 1:
                time.sleep(0.01)
            loaded_s = time.time() - t0
            snap = work / f"load{n}-snapshot.json"
            while metric(metrics(ADMIN_ON), "ringway_snapshot_file_writes_total") < 1:
                time.sleep(0.05)
            time.sleep(1)
            m = metrics(ADMIN_ON)
            r = {
                "domains": n,
                "full_load_ms": metric(m, "ringway_db_full_load_milliseconds"),
                "start_to_loaded_s": loaded_s,
                "routes": metric(m, "ringway_routes"),
                "rss_kib": rss_kib([rw2.proc.pid]),
                "rss_empty_kib": base,
                "snapshot_bytes": snap.stat().st_size if snap.exists() else None,
            }
            rw2.stop()
            results["full_load"].append(r)
            log(f"  {r}")
        psql("DELETE FROM domains WHERE hostname <> 'a.test'")

        # C. logging on versus off at scenario 1's rate.
        log(f"C: logging off/on, {ROUNDS} rounds of {DURATION}s")
        off = ringway(work, "off", PORT_OFF, ADMIN_OFF, logs=False)
        on = ringway(work, "on", PORT_ON, ADMIN_ON, logs=True)
        for p in (PORT_OFF, PORT_ON):
            subprocess.run(["taskset", "-c", LOAD_CPUS, "wrk", "-t1", "-c64", "-d2s", "-H", "Host: a.test", f"http://127.0.0.1:{p}/"], capture_output=True)
        time.sleep(2)
        psql("TRUNCATE proxy_logs")
        backends = [int(x) for x in psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{DB}' AND application_name = 'ringway'").split()]
        rounds = {"off": [], "on": []}
        for rnd in range(ROUNDS):
            for label, proc, port, admin in (("off", off, PORT_OFF, ADMIN_OFF), ("on", on, PORT_ON, ADMIN_ON)):
                m0 = metrics(admin)
                c0 = cpu_ticks([proc.proc.pid])
                b0 = cpu_ticks(backends)
                reqs, rps, errs = wrk(port)
                c1 = cpu_ticks([proc.proc.pid])
                time.sleep(1.5)
                b1 = cpu_ticks(backends)
                m1 = metrics(admin)
                r = {
                    "requests": reqs,
                    "rps": rps,
                    "errors": errs,
                    "cpu_us_per_req": (c1 - c0) * 1e6 / CLK_TCK / max(reqs, 1),
                    "rows_written": metric(m1, "ringway_log_rows_written_total") - metric(m0, "ringway_log_rows_written_total"),
                    "rows_spooled": metric(m1, "ringway_log_rows_spooled_total") - metric(m0, "ringway_log_rows_spooled_total"),
                    "rows_dropped": metric(m1, "ringway_log_rows_dropped_total") - metric(m0, "ringway_log_rows_dropped_total") + metric(m1, "ringway_log_dropped_total") - metric(m0, "ringway_log_dropped_total"),
                    "batch_p99_ms": (histogram_quantile(m1, "ringway_log_batch_write_seconds", 0.99) or 0) * 1000,
                }
                r["rows_per_s"] = r["rows_written"] / DURATION
                # The database's own work: its backends for this proxy (route store and log
                # sink connections), per row written.
                r["db_cpu_us_per_row"] = (b1 - b0) * 1e6 / CLK_TCK / r["rows_written"] if r["rows_written"] else None
                rounds[label].append(r)
                log(f"  round {rnd + 1} {label}: {json.dumps({k: (round(v, 2) if v is not None else None) for k, v in r.items()})}")
        on.stop()
        off.stop()
        total_on = sum(r["requests"] for r in rounds["on"])
        rows = int(psql("SELECT count(*) FROM proxy_logs"))
        med = lambda label, k: statistics.median([r[k] for r in rounds[label] if r[k] is not None] or [0])  # noqa: E731
        results["logging"] = {
            "rounds": rounds,
            "rps_off": med("off", "rps"),
            "rps_on": med("on", "rps"),
            "cost_pct": (1 - med("on", "rps") / med("off", "rps")) * 100,
            "cpu_us_off": med("off", "cpu_us_per_req"),
            "cpu_us_on": med("on", "cpu_us_per_req"),
            "rows_per_s": med("on", "rows_per_s"),
            "db_cpu_us_per_row": med("on", "db_cpu_us_per_row"),
            "requests_logged_on": total_on,
            "rows_in_proxy_logs": rows,
        }
        log(f"  {json.dumps({k: v for k, v in results['logging'].items() if k != 'rounds'})}")
    finally:
        for p in RUNNING:
            p.stop()
        subprocess.run(["psql", f"{PG} dbname=postgres", "-qc", f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)"], capture_output=True)

    cv, lg = results["change_visible"], results["logging"]
    md = [f"# Ringway PostgreSQL control plane, {results['meta']['date']}\n",
          f"Command: `loadtest/run-postgres.sh` (ROUNDS={ROUNDS} DURATION={DURATION} UPDATES={UPDATES} SIZES={','.join(map(str, SIZES))}); proxy on CPU {PROXY_CPUS}, wrk and origin on CPU {LOAD_CPUS}, PostgreSQL unpinned on the same machine.\n",
          "## Change to visible\n",
          f"{UPDATES} updates of one domain, each its own transaction, 5 ms apart; the proxy's histogram (trigger time to table applied), {cv['observed']:.0f} observed: p50 {cv['p50_ms']:.2f} ms, p99 {cv['p99_ms']:.2f} ms, mean {cv['mean_ms']:.2f} ms (quantiles interpolated within buckets).\n",
          "## Full load\n",
          "| domains | full load ms | start to loaded s | RSS KiB | RSS with no domains KiB | snapshot file bytes |",
          "|---:|---:|---:|---:|---:|---:|"]
    for r in results["full_load"]:
        md.append(f"| {r['domains']:,} | {r['full_load_ms']:,.0f} | {r['start_to_loaded_s']:.2f} | {r['rss_kib']:,} | {r['rss_empty_kib']:,} | {r['snapshot_bytes'] or 0:,} |")
    md += ["", "## Request logging at scenario 1's rate\n",
           "| logging | requests/s (median) | CPU µs/req | log rows written/s |", "|---|---:|---:|---:|",
           f"| off | {lg['rps_off']:,.0f} | {lg['cpu_us_off']:.2f} | – |",
           f"| on (COPY into proxy_logs) | {lg['rps_on']:,.0f} | {lg['cpu_us_on']:.2f} | {lg['rows_per_s']:,.0f} |",
           "", f"Throughput cost of logging: {lg['cost_pct']:.1f}% (the proxy's CPU per request: {(lg['cpu_us_on'] / lg['cpu_us_off'] - 1) * 100:.1f}%; PostgreSQL's backends spent {lg['db_cpu_us_per_row'] or 0:.2f} µs of CPU per row on these same two cores). Rows in proxy_logs after the runs: {lg['rows_in_proxy_logs']:,} for {lg['requests_logged_on']:,} requests wrk completed against the logging proxy (wrk does not count requests in flight at its end; those are logged too).\n"]
    text = "\n".join(md)
    print(text)
    out = ROOT / "loadtest" / "results" / os.environ.get("RESULTS_NAME", f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}-postgres")
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    log(f"wrote {out}.md, .json")


if __name__ == "__main__":
    main()
