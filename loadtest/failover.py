#!/usr/bin/env python3
"""Failover and balancing cost: Ringway against nginx and HAProxy (issue 10's figures).

Part A, failover: three origins behind each proxy; a fixed offered load (RATE requests/s over
CONNS keep-alive connections, `ringway-loadgen timeline`: requests due on a schedule, a failed
request counted and its connection reopened) runs for RUN_S seconds; origin 3 is killed
(SIGKILL) KILL_AT_S seconds in and started again RESTART_AT_S seconds in. Per run: failed
requests, p99 latency of the requests due in the failure window [kill, restart), and the time
from the restart until origin 3 answers proxied requests again (its own request counter, read
every 20 ms). Each proxy set up as well as it allows:
- Ringway: defaults (passive ejection, retries on connect failure and on idempotent requests
  without a response byte) plus an active check every 200 ms (rise 1, fall 2) and a 1 s first
  ejection;
- nginx: `max_fails=1 fail_timeout=1s`, `proxy_next_upstream error timeout http_502 http_503
  http_504`, 3 tries, keep-alive upstreams (open source nginx has no active checks);
- HAProxy: `check inter 200ms fall 2 rise 1`, `observe layer4 error-limit 1 on-error
  mark-down`, `retries 2`, `option redispatch 1`, `retry-on conn-failure empty-response
  response-timeout`, `http-reuse always`.

Part B, balancing cost: scenario 1 (wrk, 64 keep-alive connections) against two Ringways, one
with one upstream and one with three upstreams under power of two choices (three addresses,
127.0.0.1-3, of the one origin process, so the origin's work is the same), paired rounds
alternating which goes first; CPU microseconds per request.

PROXIES (ringway,nginx,haproxy), ROUNDS (5), RATE (2000), CONNS (32), RUN_S (20), KILL_AT_S (5), RESTART_AT_S (10), DURATION
(part B, 10 s), PARTS (A,B), PROXY_CPUS (0), LOAD_CPUS (1). Output: markdown on stdout and
results/failover-<date>.{md,json}.
"""

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cpu_ticks, proc_tree  # noqa: E402  (the same CPU accounting as run.sh)

LT = Path(__file__).resolve().parent
REL = LT.parent / "target" / "release"
ROUNDS = int(os.environ.get("ROUNDS", "5"))
RATE = int(os.environ.get("RATE", "2000"))
CONNS = int(os.environ.get("CONNS", "32"))
RUN_S = float(os.environ.get("RUN_S", "20"))
KILL_AT = float(os.environ.get("KILL_AT_S", "5"))
RESTART_AT = float(os.environ.get("RESTART_AT_S", "10"))
DURATION = int(os.environ.get("DURATION", "10"))
PARTS = os.environ.get("PARTS", "A,B").split(",")
PROXY_CPUS = os.environ.get("PROXY_CPUS", "0")
LOAD_CPUS = os.environ.get("LOAD_CPUS", "1")
ORIGINS = [19101, 19102, 19103]
PORTS = {"ringway": 19110, "nginx": 19120, "haproxy": 19130, "ringway-1": 19140, "ringway-p2c": 19150}
ADMIN = {"ringway": 19111, "ringway-1": 19141, "ringway-p2c": 19151}
# The loadgen starts its schedule 200 ms after it starts.
LOADGEN_LEAD_S = 0.2


def log(msg):
    print(f"[failover] {msg}", file=sys.stderr, flush=True)


def taskset(cpus, argv):
    return ["taskset", "-c", cpus] + argv


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def http_get(port, path="/", host="localhost", timeout=0.5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


def origin_requests(port):
    """Requests origin `port` answered (its stats and health checks, `/__*`, not counted)."""
    try:
        body = http_get(port, "/__stats")
    except OSError:
        return None
    for part in body.split():
        if part.startswith("requests="):
            return int(part.split("=", 1)[1])
    return None


def start_origin(port, listen="127.0.0.1"):
    # SO_REUSEPORT would let a leftover origin share the port and hide the kill.
    if wait_port(port, timeout=0.05):
        raise RuntimeError(f"port {port} is already taken (a leftover origin?)")
    p = subprocess.Popen(taskset(LOAD_CPUS, [str(REL / "ringway-origin"), "--listen", f"{listen}:{port}", "--threads", "1", "--cores", LOAD_CPUS]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_port(port):
        raise RuntimeError(f"origin {port} did not start")
    return p


def write_configs(work):
    ups = ", ".join(f'"127.0.0.1:{p}"' for p in ORIGINS)

    def ringway(name, routes):
        (work / f"{name}.toml").write_text(
            f"""[workers]
count = 1
pin = true
cores = [{PROXY_CPUS.split(',')[0]}]
[listen]
http = "127.0.0.1:{PORTS[name]}"
backlog = 4096
[admin]
listen = "127.0.0.1:{ADMIN[name]}"
[routes]
file = "{name}-routes.toml"
[access_log]
enabled = false
"""
        )
        (work / f"{name}-routes.toml").write_text(routes)

    ringway("ringway", f'default = "o"\n[[route]]\nname = "o"\nupstreams = [{ups}]\n'
            "[route.outlier]\nejection_ms = 1000\n"
            '[route.health_check]\npath = "/__health"\ninterval_ms = 200\ntimeout_ms = 200\nrise = 1\nfall = 2\n')
    ringway("ringway-1", f'default = "o"\n[[route]]\nname = "o"\nupstreams = ["127.0.0.1:{ORIGINS[0]}"]\n')
    # Three endpoints of one origin process (127.0.0.1-3, the origin listening on 0.0.0.0):
    # the origin's side is the same as with one upstream, only the proxy's work differs.
    ups3 = ", ".join(f'"127.0.0.{i}:{ORIGINS[0]}"' for i in (1, 2, 3))
    ringway("ringway-p2c", f'default = "o"\n[[route]]\nname = "o"\nupstreams = [{ups3}]\n[route.balancer]\nstrategy = "p2c"\n')
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in ORIGINS)
    (work / "nginx.conf").write_text(
        f"""worker_processes 1;
worker_cpu_affinity 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log error;
daemon off;
events {{ worker_connections 10000; use epoll; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  keepalive_requests 1000000;
  upstream three {{
{servers}
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{PORTS['nginx']} reuseport backlog=4096;
    location / {{
      proxy_pass http://three;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_connect_timeout 1s;
      proxy_read_timeout 10s;
      proxy_next_upstream error timeout http_502 http_503 http_504;
      proxy_next_upstream_tries 3;
    }}
  }}
}}
"""
    )
    hservers = "\n".join(f"    server o{i} 127.0.0.1:{p} check" for i, p in enumerate(ORIGINS))
    (work / "haproxy.cfg").write_text(
        f"""global
    nbthread 1
    cpu-map 1/1 {PROXY_CPUS.split(',')[0]}
    maxconn 8000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 10s
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
frontend fe
    bind 127.0.0.1:{PORTS['haproxy']}
    default_backend three
backend three
    balance roundrobin
    http-reuse always
    option httpchk GET /__health
    default-server inter 200ms fastinter 200ms downinter 200ms fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down
{hservers}
"""
    )


def start_proxy(name, work):
    if name.startswith("ringway"):
        argv = [str(REL / "ringway"), "serve", "--config", str(work / f"{name}.toml")]
    elif name == "nginx":
        argv = ["nginx", "-c", str(work / "nginx.conf")]
    else:
        argv = ["haproxy", "-f", str(work / "haproxy.cfg")]
    p = subprocess.Popen(taskset(PROXY_CPUS, argv), cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.err", "a"))
    if not wait_port(PORTS[name]):
        raise RuntimeError(f"{name} did not start")
    time.sleep(0.5)  # first health checks, pools
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def failover_run(name, work):
    origins, proxy = [], None
    try:
        origins = [start_origin(p) for p in ORIGINS]
        proxy = start_proxy(name, work)
        subprocess.run(taskset(LOAD_CPUS, ["wrk", "-t1", "-c16", "-d1s", "-H", "Host: localhost", f"http://127.0.0.1:{PORTS[name]}/"]), capture_output=True)
        env = dict(os.environ, LOADGEN_WINDOW_MS=f"{int(KILL_AT * 1000)}-{int(RESTART_AT * 1000)}")
        argv = [str(REL / "ringway-loadgen"), "timeline", f"127.0.0.1:{PORTS[name]}", "localhost", "/", "--rate", str(RATE), "--connections", str(CONNS), "--seconds", str(RUN_S)]
        t0 = time.time()
        lg = subprocess.Popen(taskset(LOAD_CPUS, argv), stdout=subprocess.PIPE, text=True, env=env)
        start = t0 + LOADGEN_LEAD_S
        time.sleep(max(0.0, start + KILL_AT - time.time()))
        origins[2].kill()
        origins[2].wait()
        time.sleep(max(0.0, start + RESTART_AT - time.time()))
        origins[2] = start_origin(ORIGINS[2])
        restarted = time.time()
        readmit = None
        base = origin_requests(ORIGINS[2]) or 0
        while time.time() < start + RUN_S:
            n = origin_requests(ORIGINS[2])
            if n is not None and n > base:
                readmit = time.time() - restarted
                break
            time.sleep(0.02)
        out, _ = lg.communicate(timeout=RUN_S + 30)
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        summary = next(x for x in lines if "mode" in x)
        window = next((x for x in lines if "window_ms" in x), {})
        buckets = [x for x in lines if "t_ms" in x]
        # Ejection: the end of the last 100 ms bucket after the kill whose p99 is over 3x
        # the median p99 before it (or that held failures).
        before = [b["p99_ms"] for b in buckets if b["t_ms"] < KILL_AT * 1000] or [0]
        calm = statistics.median(before)
        disturbed = [b["t_ms"] for b in buckets if KILL_AT * 1000 <= b["t_ms"] < RESTART_AT * 1000 and (b["failed"] or b["p99_ms"] > 3 * calm + 1)]
        settle = (max(disturbed) + 100 - KILL_AT * 1000) / 1000 if disturbed else 0.0
        return {
            "completed": summary["completed"],
            "failed": summary["errors"],
            "p99_ms": summary["p99_ms"],
            "window_p99_ms": window.get("p99_ms"),
            "window_max_ms": window.get("max_ms"),
            "window_failed": window.get("failed"),
            "readmit_s": readmit,
            "disturbed_s": settle,
        }
    finally:
        if proxy is not None:
            stop(proxy)
        for o in origins:
            stop(o)
        time.sleep(0.3)


def steady_run(name, work):
    pids = proc_tree(ALL_PROCS[name].pid)
    c0 = cpu_ticks(pids)
    out = subprocess.run(taskset(LOAD_CPUS, ["wrk", "-t1", "-c64", f"-d{DURATION}s", "-H", "Host: localhost", f"http://127.0.0.1:{PORTS[name]}/"]), capture_output=True, text=True).stdout
    c1 = cpu_ticks(pids)
    reqs = 0
    for line in out.splitlines():
        if "requests in" in line:
            reqs = int(line.split()[0])
    hz = os.sysconf("SC_CLK_TCK")
    cpu_s = (c1 - c0) / hz
    return {"requests": reqs, "rps": reqs / DURATION, "cpu_us_per_req": cpu_s * 1e6 / max(reqs, 1)}


ALL_PROCS = {}


def fmt(v, nd=1):
    if v is None:
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def spread(xs, nd=1):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{fmt(statistics.median(xs), nd)} ({fmt(min(xs), nd)}–{fmt(max(xs), nd)})"


def main():
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d-%H%M")
    work = LT / "results" / "tmp" / f"failover-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    write_configs(work)
    results = {"A": {}, "B": {}}
    proxies = [p for p in os.environ.get("PROXIES", "ringway,nginx,haproxy").split(",") if p]
    if "A" in PARTS:
        for r in range(ROUNDS):
            order = proxies[r % 3:] + proxies[:r % 3]
            for name in order:
                res = failover_run(name, work)
                results["A"].setdefault(name, []).append(res)
                log(f"A round {r + 1} {name}: {res}")
    if "B" in PARTS:
        origins = [start_origin(ORIGINS[0], listen="0.0.0.0")]
        try:
            for name in ["ringway-1", "ringway-p2c"]:
                ALL_PROCS[name] = start_proxy(name, work)
                subprocess.run(taskset(LOAD_CPUS, ["wrk", "-t1", "-c64", "-d2s", "-H", "Host: localhost", f"http://127.0.0.1:{PORTS[name]}/"]), capture_output=True)
            for r in range(ROUNDS):
                pair = ["ringway-1", "ringway-p2c"] if r % 2 == 0 else ["ringway-p2c", "ringway-1"]
                for name in pair:
                    res = steady_run(name, work)
                    results["B"].setdefault(name, []).append(res)
                    log(f"B round {r + 1} {name}: {res}")
        finally:
            for p in ALL_PROCS.values():
                stop(p)
            for o in origins:
                stop(o)

    L = [f"# Failover and balancing cost ({datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {platform.node()}, kernel {platform.release()})", ""]
    L.append(f"Command: `python3 loadtest/failover.py` (ROUNDS={ROUNDS} RATE={RATE} CONNS={CONNS} RUN_S={RUN_S} KILL_AT_S={KILL_AT} RESTART_AT_S={RESTART_AT} DURATION={DURATION}); proxy on CPU {PROXY_CPUS}, load and origins on CPU {LOAD_CPUS}. Figures: median (min–max) over rounds.")
    if results["A"]:
        L += ["", f"## A. One of three origins killed at {KILL_AT:g} s of {RUN_S:g} s, restarted at {RESTART_AT:g} s ({RATE} requests/s offered)", "",
              "| proxy | failed requests | p99 ms, whole run | p99 ms, failure window | max ms, failure window | disturbed after the kill (s) | readmitted after restart (s) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for name, rs in results["A"].items():
            L.append(f"| {name} | {spread([r['failed'] for r in rs], 0)} | {spread([r['p99_ms'] for r in rs], 2)} | {spread([r['window_p99_ms'] for r in rs], 2)} | {spread([r['window_max_ms'] for r in rs], 1)} | {spread([r['disturbed_s'] for r in rs], 1)} | {spread([r['readmit_s'] for r in rs], 2)} |")
        L.append("")
        L.append("Per round (failed, readmit s): " + "; ".join(f"{n}: " + ", ".join(f"{r['failed']}/{fmt(r['readmit_s'], 2)}" for r in rs) for n, rs in results["A"].items()))
    if results["B"]:
        one, p2c = results["B"]["ringway-1"], results["B"]["ringway-p2c"]
        ratios = [b["cpu_us_per_req"] / a["cpu_us_per_req"] for a, b in zip(one, p2c)]
        L += ["", "## B. Scenario 1 (wrk -c64 keep-alive): three upstreams under P2C against one upstream", "",
              "| Ringway | requests/s | CPU µs/req |", "|---|---:|---:|"]
        for name, rs in results["B"].items():
            L.append(f"| {name} | {spread([r['rps'] for r in rs], 0)} | {spread([r['cpu_us_per_req'] for r in rs], 2)} |")
        L.append("")
        L.append(f"CPU per request, P2C over three / one upstream, paired by round: {spread(ratios, 3)}; per round: {', '.join(f'{x:.3f}' for x in ratios)}.")
    md = "\n".join(L)
    print(md)
    base = LT / "results" / f"failover-{stamp[:10]}"
    base.with_suffix(".md").write_text(md + "\n")
    base.with_suffix(".json").write_text(json.dumps(results, indent=1))
    log(f"wrote {base}.md, .json")


if __name__ == "__main__":
    main()
