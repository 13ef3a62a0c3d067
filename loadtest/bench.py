#!/usr/bin/env python3
"""Ringway load tests against nginx and HAProxy (driven by loadtest/run.sh).

Every scenario runs against every proxy in turn, interleaved, for ROUNDS rounds; figures are
medians over rounds. CPU time is read from /proc/PID/stat (utime+stime of all the proxy's
processes) around each run. See loadtest/README.md for the method.
"""

import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LT = ROOT / "loadtest"
REL = ROOT / "target" / "release"

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNS = int(os.environ.get("CONNECTIONS", "64"))
IDLE_CONNS = int(os.environ.get("IDLE_CONNECTIONS", "10000"))
NPROC = os.cpu_count() or 2
PROXY_CPUS = os.environ.get("PROXY_CPUS", "0")
LOAD_CPUS = os.environ.get("LOAD_CPUS", "1" if NPROC > 1 else "0")
SCENARIOS = [s.strip() for s in os.environ.get("SCENARIOS", "1,2,3,4,5,6,7,8,9").split(",") if s.strip()]
PROXIES = [p.strip() for p in os.environ.get("PROXIES", "ringway,nginx,haproxy").split(",") if p.strip()]
# Overrides of Ringway's config: "section.key=value;section.key=value" (TOML values).
RINGWAY_SET = [kv.strip() for kv in os.environ.get("RINGWAY_SET", "").split(";") if kv.strip()]

ORIGIN_PORT, RW_PORT, NG_PORT, HA_PORT, RW100K_PORT, RWPOL_PORT, RWBASE_PORT = 18000, 18001, 18002, 18003, 18004, 18005, 18006
# HTTPS listeners (scenario 6), same certificate for all three.
TLS_PORTS = {"ringway": 18011, "nginx": 18012, "haproxy": 18013}
RW_ADMIN, RW100K_ADMIN, RWPOL_ADMIN, RWBASE_ADMIN = 18091, 18094, 18095, 18096
# A second Ringway binary (an earlier build) measured beside the current one in scenario 1,
# paired by round: RINGWAY_BASELINE=/path/to/ringway.
BASELINE_BIN = os.environ.get("RINGWAY_BASELINE", "")
# Scenario 9: slow clients held while legitimate keep-alive load runs.
SLOW_HEADER_CONNS = int(os.environ.get("SLOW_HEADER_CONNECTIONS", "6000"))
SLOW_BODY_CONNS = int(os.environ.get("SLOW_BODY_CONNECTIONS", "200"))
PORTS = {"ringway": RW_PORT, "nginx": NG_PORT, "haproxy": HA_PORT, "ringway-100k": RW100K_PORT, "ringway-policy": RWPOL_PORT, "origin": ORIGIN_PORT}
# Scenario 8: IP rules in the ACL of the policy instance, none matching the load generator.
POLICY_RULES = int(os.environ.get("POLICY_RULES", "10000"))
# TLS idle connections (6c) cost a full handshake each from a Python client: fewer of them.
TLS_IDLE_CONNS = int(os.environ.get("TLS_IDLE_CONNECTIONS", "5000"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
# run.sh raises the soft limit to the hard one; proxies are configured to fit in it.
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
# HAProxy refuses to start unless ulimit-n covers two descriptors per connection.
HA_MAXCONN = min(100000, IDLE_CONNS + 2000, (NOFILE - 200) // 2)


def idle_conns_for(pname):
    # HAProxy cannot hold more than maxconn; on a machine with a low descriptor limit it gets
    # fewer idle connections (the report shows how many).
    return min(IDLE_CONNS, HA_MAXCONN - 100) if pname == "haproxy" else IDLE_CONNS


def cpu_list(spec):
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


PROXY_CPU_LIST = cpu_list(PROXY_CPUS)
WORKERS = len(PROXY_CPU_LIST)


def log(msg):
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_port(port, timeout=15.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def proc_tree(pid):
    """pid and all its descendants."""
    pids = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        children = []
    for c in children:
        pids.extend(proc_tree(int(c)))
    return pids


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        except (FileNotFoundError, IndexError):
            pass
    return total


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def origin_stats():
    body = urllib.request.urlopen(f"http://127.0.0.1:{ORIGIN_PORT}/__stats", timeout=5).read().decode()
    d = dict(kv.split("=") for kv in body.split())
    return int(d["connections"]), int(d["requests"])


class Proxy:
    def __init__(self, name, argv, port):
        self.name, self.argv, self.port = name, argv, port
        self.proc = None

    def start(self, workdir):
        out = open(workdir / f"{self.name}.out", "w")
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port)
        time.sleep(0.3)

    def pids(self):
        return proc_tree(self.proc.pid)

    def restart(self, workdir):
        """Stops and starts the proxy, warms it up briefly; returns its new pids."""
        self.stop()
        self.start(workdir)
        subprocess.run(taskset(LOAD_CPUS, ["wrk", "-t1", "-c8", "-d1s", "-H", "Host: localhost", f"http://127.0.0.1:{self.port}/"]), capture_output=True)
        return self.pids()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def taskset(cpus, argv):
    return ["taskset", "-c", cpus] + argv


def write_configs(workdir):
    mask = lambda c: format(1 << c, "b")  # noqa: E731
    routes = workdir / "routes.toml"
    routes.write_text(
        f'default = "origin"\n[[route]]\nname = "origin"\nhosts = ["localhost"]\nupstreams = ["127.0.0.1:{ORIGIN_PORT}"]\n'
        '[[certificate]]\nname = "localhost"\ncert = "tls/localhost.crt"\nkey = "tls/localhost.key"\n'
        '[tls]\ndefault_certificate = "localhost"\n'
    )
    sections = {}
    for kv in RINGWAY_SET:
        key, value = kv.split("=", 1)
        section, name = key.strip().split(".", 1)
        sections.setdefault(section, []).append(f"{name.strip()} = {value.strip()}")
    extra_for = lambda sec: "\n".join(sections.pop(sec, []))  # noqa: E731
    rw = workdir / "ringway.toml"
    text = (
        f"""[workers]
count = {WORKERS}
pin = true
cores = [{", ".join(map(str, PROXY_CPU_LIST))}]
[listen]
http = "127.0.0.1:{RW_PORT}"
https = "127.0.0.1:{TLS_PORTS['ringway']}"
backlog = 4096
[admin]
listen = "127.0.0.1:{RW_ADMIN}"
[limits]
connections_per_worker_max = 100000
body_bytes_max = 1073741824
[routes]
file = "routes.toml"
[access_log]
enabled = false
"""
    )
    # Put each override under its table (appending "[workers]" twice would be invalid TOML).
    for sec in ["workers", "listen", "admin", "limits", "routes", "access_log"]:
        extra = extra_for(sec)
        if extra:
            text = text.replace(f"[{sec}]\n", f"[{sec}]\n{extra}\n", 1)
    for sec in list(sections):
        text += f"[{sec}]\n{extra_for(sec)}\n"
    rw.write_text(text)
    # 100,000 routes: every host points at the origin; the load test asks for one in the middle.
    lines = ['default = "r0"']
    for i in range(100_000):
        lines.append(f'[[route]]\nname = "r{i}"\nhosts = ["h{i}.example.test"]\nupstreams = ["127.0.0.1:{ORIGIN_PORT}"]\nproject_id = {i}')
    (workdir / "routes-100k.toml").write_text("\n".join(lines) + "\n")
    def variant(name, port, admin, routes_file):
        """A second Ringway like the first, on its own ports and routes file, plain HTTP only."""
        (workdir / name).write_text(
            rw.read_text()
            .replace(f"127.0.0.1:{RW_PORT}", f"127.0.0.1:{port}")
            .replace(f"127.0.0.1:{RW_ADMIN}", f"127.0.0.1:{admin}")
            .replace('file = "routes.toml"', f'file = "{routes_file}"')
            .replace(f'https = "127.0.0.1:{TLS_PORTS["ringway"]}"\n', "")
        )

    variant("ringway-100k.toml", RW100K_PORT, RW100K_ADMIN, "routes-100k.toml")
    variant("ringway-baseline.toml", RWBASE_PORT, RWBASE_ADMIN, "routes.toml")
    # Scenario 8: the same route under a project policy with a 10,000-rule deny list (random
    # /32 and /24 outside 127/8, a tenth IPv6) and a rate limit per client that is never hit.
    # Visitor cookies are off: the figure is the cost of the checks, not of a Set-Cookie.
    import random
    rnd = random.Random(8)
    deny = []
    for i in range(POLICY_RULES):
        if i % 10 == 9:
            deny.append(f"2001:db8:{rnd.randrange(65536):x}::/48")
        else:
            a = rnd.randrange(0x0B000000, 0x7F000000) if rnd.random() < 0.5 else rnd.randrange(0x80000000, 0xE0000000)
            ip = ".".join(str((a >> s) & 255) for s in (24, 16, 8, 0))
            deny.append(f"{ip}/32" if i % 3 else f"{ip.rsplit('.', 1)[0]}.0/24")
    (workdir / "routes-policy.toml").write_text(
        f'default = "origin"\n[[route]]\nname = "origin"\nhosts = ["localhost"]\nupstreams = ["127.0.0.1:{ORIGIN_PORT}"]\nproject_id = 1\n'
        "[[policy]]\nproject_id = 1\nip_mode = \"deny_list\"\nvisitor_cookies = false\n"
        "deny = [" + ", ".join(f'"{d}"' for d in deny) + "]\n"
        "[[policy.rate_limit]]\nrps = 1000000\nburst = 1000000\n"
    )
    variant("ringway-policy.toml", RWPOL_PORT, RWPOL_ADMIN, "routes-policy.toml")
    affinity = " ".join(mask(c) for c in PROXY_CPU_LIST)
    (workdir / "nginx.conf").write_text(
        f"""worker_processes {WORKERS};
worker_cpu_affinity {affinity};
worker_rlimit_nofile {NOFILE};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
daemon off;
events {{ worker_connections {min(100000, NOFILE - 100)}; use epoll; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/nginx-body;
  proxy_temp_path {workdir}/nginx-proxy;
  client_max_body_size 0;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  # Slow clients (scenario 9), set as an operator defending against them would, to
  # Ringway's defaults: a whole head within 10 s, no 10 s without body bytes or without the
  # client taking response bytes.
  client_header_timeout 10s;
  client_body_timeout 10s;
  send_timeout 10s;
  upstream origin {{ server 127.0.0.1:{ORIGIN_PORT}; keepalive 128; keepalive_requests 1000000; }}
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on;
  server {{
    listen 127.0.0.1:{NG_PORT} reuseport backlog=4096;
    listen 127.0.0.1:{TLS_PORTS['nginx']} ssl reuseport backlog=4096;
    ssl_certificate {workdir}/tls/localhost.crt;
    ssl_certificate_key {workdir}/tls/localhost.key;
    # Scenario 9's uploads: nginx's default request buffering (the whole body before the
    # upstream is contacted), with a 64 KiB memory buffer like Ringway's request_buffer_bytes.
    location /slow-upload {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering on;
      client_body_buffer_size 64k;
    }}
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Request-ID $request_id;
      # Response buffers sized for the largest body of the scenarios (1 MiB: 64 x 16 KiB),
      # as an operator tunes nginx for such bodies; never to disk. (`proxy_buffering off`
      # makes nginx copy in small reads and once made a 1.5x lead read 2.9x.)
      proxy_buffering on;
      proxy_buffer_size 16k;
      proxy_buffers 64 16k;
      proxy_busy_buffers_size 64k;
      proxy_max_temp_file_size 0;
      proxy_request_buffering off;
      add_header X-Content-Type-Options nosniff;
      add_header X-Frame-Options SAMEORIGIN;
      add_header Referrer-Policy strict-origin-when-cross-origin;
      add_header X-Request-ID $request_id;
    }}
  }}
}}
"""
    )
    (workdir / "nginx-body").mkdir(exist_ok=True)
    (workdir / "nginx-proxy").mkdir(exist_ok=True)
    cpu_map = " ".join(f"cpu-map auto:1/{i + 1} {c}" for i, c in enumerate(PROXY_CPU_LIST))
    (workdir / "haproxy.cfg").write_text(
        f"""global
  nbthread {WORKERS}
  {cpu_map}
  # Fits the file descriptor limit of this machine (HAProxy wants two per connection).
  ulimit-n {NOFILE}
  maxconn {HA_MAXCONN}
defaults
  mode http
  timeout connect 3s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  # Slow clients (scenario 9): a whole request head within 10 s, as Ringway's default; the
  # body (with http-buffer-request) counts against it too.
  timeout http-request 10s
  option http-keep-alive
  http-reuse always
frontend fe
  option http-buffer-request
  bind 127.0.0.1:{HA_PORT}
  bind 127.0.0.1:{TLS_PORTS['haproxy']} ssl crt {workdir}/tls/localhost.pem alpn http/1.1 ssl-min-ver TLSv1.2
  option forwardfor
  unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
  unique-id-header X-Request-ID
  http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
  http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-response set-header X-Content-Type-Options nosniff
  http-response set-header X-Frame-Options SAMEORIGIN
  http-response set-header Referrer-Policy strict-origin-when-cross-origin
  default_backend be
backend be
  server origin 127.0.0.1:{ORIGIN_PORT} maxconn 10000
"""
    )
    (workdir / "upload.lua").write_text('wrk.method = "POST"\nwrk.body = string.rep("x", 1048576)\nwrk.headers["Content-Type"] = "application/octet-stream"\n')


WRK_LAT = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def to_ms(v, unit):
    return float(v) / 1000 if unit == "us" else float(v) * 1000 if unit == "s" else float(v)


def run_wrk(port, path="/", conns=CONNS, extra=None, host="localhost", scheme="http"):
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{DURATION}s", "--latency", "-H", f"Host: {host}"]
    if extra:
        argv += extra
    # Over TLS wrk sends the URL's host as SNI: "localhost", the certificate's name.
    argv.append(f"{scheme}://127.0.0.1:{port}{path}" if scheme == "http" else f"{scheme}://localhost:{port}{path}")
    out = subprocess.run(taskset(LOAD_CPUS, argv), capture_output=True, text=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {f"p{m.group(1)}_ms": to_ms(m.group(2), m.group(3)) for m in WRK_LAT.finditer(out)}
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    return {"requests": reqs, "rps": rps, "errors": errs, **lat}


def measure(proxy_pids, fn):
    c0, r0 = origin_stats()
    t0 = cpu_ticks(proxy_pids)
    res = fn()
    t1 = cpu_ticks(proxy_pids)
    c1, r1 = origin_stats()
    reqs = max(res.get("requests", 0), 1)
    res["cpu_us_per_req"] = (t1 - t0) * 1e6 / CLK_TCK / reqs
    res["cpu_util"] = (t1 - t0) / CLK_TCK / DURATION
    res["rss_kib"] = rss_kib(proxy_pids)
    # Exclude our own /__stats requests from the count.
    res["upstream_conns_per_1k"] = (c1 - c0) * 1000.0 / reqs
    res["upstream_requests"] = r1 - r0 - 1
    return res


def established(port, local=True, pids=None):
    """TCP connections in ESTABLISHED on (local) or to (remote) `port`, of `pids` if given."""
    side = "sport" if local else "dport"
    argv = ["ss", "-Htn"] + (["-p"] if pids else []) + ["state", "established", f"( {side} = :{port} )"]
    lines = subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()
    if pids:
        lines = [l for l in lines if any(f"pid={p}," in l for p in pids)]
    return len(lines)


def slow_clients_run(port, pids):
    """Scenario 9: wrk's keep-alive load while slow clients are held; returns its result with
    the slow clients' counts and the connections held, sampled once a second."""
    seconds = str(DURATION + 8)
    lg = str(REL / "ringway-loadgen")
    hdr = subprocess.Popen(taskset(LOAD_CPUS, [lg, "slow", f"127.0.0.1:{port}", "localhost", "/", "--connections", str(SLOW_HEADER_CONNS), "--seconds", seconds, "--kind", "headers"]), stdout=subprocess.PIPE, text=True)
    body = subprocess.Popen(taskset(LOAD_CPUS, [lg, "slow", f"127.0.0.1:{port}", "localhost", "/slow-upload", "--connections", str(SLOW_BODY_CONNS), "--seconds", seconds, "--kind", "body"]), stdout=subprocess.PIPE, text=True)
    hdr.stdout.readline()
    body.stdout.readline()
    time.sleep(3)
    samples = []
    stop = [False]

    def sample():
        while not stop[0]:
            samples.append((established(port), established(ORIGIN_PORT, local=False, pids=pids)))
            time.sleep(1)

    import threading
    t = threading.Thread(target=sample)
    t.start()
    r = measure(pids, lambda: run_wrk(port))
    stop[0] = True
    t.join()
    h = json.loads(hdr.stdout.readlines()[-1])
    b = json.loads(body.stdout.readlines()[-1])
    hdr.wait()
    body.wait()
    r["client_conns_held"] = median([x[0] for x in samples])
    r["upstream_conns_held"] = median([x[1] for x in samples])
    r["slow_header_closed_by_proxy"] = h["closed_by_server"]
    r["slow_body_closed_by_proxy"] = b["closed_by_server"]
    r["slow_connect_errors"] = h["connect_errors"] + b["connect_errors"]
    return r


def scenario_runs(name, proxies, nginx_max):
    """Returns {proxy: result} for one round of one scenario."""
    out = {}
    for pname in proxies:
        p = ALL[pname]
        pids = p.pids()
        port = p.port
        if name == "1":
            out[pname] = measure(pids, lambda: run_wrk(port))
        elif name == "2":
            out[pname] = measure(pids, lambda: run_wrk(port, extra=["-H", "Connection: close"]))
        elif name == "3-down":
            out[pname] = measure(pids, lambda: run_wrk(port, path="/bytes/1048576", conns=16))
        elif name == "3-up":
            out[pname] = measure(pids, lambda: run_wrk(port, path="/upload", conns=16, extra=["-s", str(WORK / "upload.lua")]))
        elif name == "4":
            rate = max(int(nginx_max * 0.5), 1000)

            def fixed():
                argv = [str(REL / "ringway-loadgen"), "rate", f"127.0.0.1:{port}", "localhost", "/", "--rate", str(rate), "--connections", str(CONNS), "--seconds", str(DURATION)]
                o = subprocess.run(taskset(LOAD_CPUS, argv), capture_output=True, text=True).stdout.strip().splitlines()[-1]
                d = json.loads(o)
                return {"requests": d["completed"], "rps": d["achieved_rps"], "offered_rps": rate, "errors": d["errors"], "p50_ms": d["p50_ms"], "p99_ms": d["p99_ms"], "p999_ms": d["p999_ms"], "max_ms": d["max_ms"]}

            out[pname] = measure(pids, fixed)
        elif name == "5":
            # A fresh process: nginx and HAProxy keep freed memory, so after an earlier round
            # their RSS would not grow and the figure would read 0.
            pids = p.restart(WORK)
            time.sleep(1)
            before = rss_kib(pids)
            n = idle_conns_for(pname)
            argv = [str(REL / "ringway-loadgen"), "idle", f"127.0.0.1:{port}", "localhost", "/", "--connections", str(n), "--hold-seconds", "30"]
            lg = subprocess.Popen(taskset(LOAD_CPUS, argv), stdout=subprocess.PIPE, text=True)
            ready = lg.stdout.readline().strip()
            time.sleep(2)
            during = rss_kib(pids)
            lg.send_signal(signal.SIGTERM)
            lg.wait()
            out[pname] = {"requests": n, "connections": n, "ready": ready == "ready", "rss_before_kib": before, "rss_idle_kib": during, "kib_per_idle_conn": (during - before) / n}
            time.sleep(2)
        elif name == "6-ka":
            out[pname] = measure(pids, lambda: run_wrk(TLS_PORTS[pname], scheme="https"))
        elif name == "6-hs":
            before = rw_tls_counts() if pname == "ringway" else None
            tls_port = TLS_PORTS[pname]

            def full_handshakes():
                # wrk and h2load resume sessions; ringway-loadgen never does.
                argv = [str(REL / "ringway-loadgen"), "handshakes", f"127.0.0.1:{tls_port}", "localhost", "/", "--connections", str(CONNS), "--seconds", str(DURATION)]
                d = json.loads(subprocess.run(taskset(LOAD_CPUS, argv), capture_output=True, text=True).stdout.strip().splitlines()[-1])
                return {"requests": d["completed"], "rps": d["achieved_rps"], "errors": d["errors"], "p50_ms": d["p50_ms"], "p99_ms": d["p99_ms"]}

            r = measure(pids, full_handshakes)
            # Full handshakes per second one core can do: the inverse of the proxy's CPU time
            # per connection (handshake + one proxied request + TCP setup and teardown).
            r["handshakes_per_core_s"] = 1e6 / r["cpu_us_per_req"] if r.get("cpu_us_per_req") else None
            if before is not None:
                after = rw_tls_counts()
                hs = after[0] - before[0]
                r["tls13_fraction"] = (after[2] - before[2]) / hs if hs else None
                r["resumed_fraction"] = (after[1] - before[1]) / hs if hs else None
            out[pname] = r
        elif name == "6-idle":
            pids = p.restart(WORK)
            time.sleep(1)
            before = rss_kib(pids)
            n = min(TLS_IDLE_CONNS, idle_conns_for(pname))
            argv = ["python3", str(LT / "tls_idle.py"), f"127.0.0.1:{TLS_PORTS[pname]}", "localhost", "--connections", str(n), "--hold-seconds", "120"]
            lg = subprocess.Popen(taskset(LOAD_CPUS, argv), stdout=subprocess.PIPE, text=True)
            ready = lg.stdout.readline().strip()
            time.sleep(2)
            during = rss_kib(pids)
            lg.send_signal(signal.SIGTERM)
            info = json.loads(lg.stdout.readline() or "{}")
            lg.wait()
            held = info.get("connected", 0)
            out[pname] = {"requests": held, "connections": held, "errors": info.get("errors"), "ready": ready == "ready", "rss_before_kib": before, "rss_idle_kib": during, "kib_per_idle_conn": (during - before) / held if held else None}
            time.sleep(2)
        elif name == "7":
            out[pname] = measure(pids, lambda: run_wrk(port, host="h50000.example.test"))
        elif name == "8":
            # Scenario 1 again, on plain Ringway and on the policy instance back to back.
            out[pname] = measure(pids, lambda: run_wrk(port))
        elif name == "9-base":
            # Scenario 1 right before the attack, for the ratio in the same round.
            out[pname] = measure(pids, lambda: run_wrk(port))
        elif name == "9":
            out[pname] = slow_clients_run(port, pids)
    return out


def rw_tls_counts():
    """Ringway's (handshakes, resumptions, TLS 1.3 handshakes) from its metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{RW_ADMIN}/metrics", timeout=5).read().decode()
    total = lambda name, label="": sum(  # noqa: E731
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") and label in line
    )
    return (total("ringway_tls_handshakes_total"), total("ringway_tls_resumptions_total"), total("ringway_tls_handshakes_total", 'version="1.3"'))


SCENARIO_TITLES = {
    "origin": "origin alone (its own maximum)",
    "1": "1. HTTP/1.1 keep-alive, 13-byte response, 64 connections",
    "2": "2. new connection per request (Connection: close), 64 connections",
    "3-down": "3a. 1 MiB responses, 16 connections",
    "3-up": "3b. 1 MiB uploads, 16 connections",
    "4": "4. fixed offered load (half of nginx's scenario-1 rate), 64 connections",
    "5": "5. idle keep-alive connections (10,000, fewer for HAProxy if the descriptor limit is low)",
    "6-ka": "6a. HTTPS keep-alive (TLS 1.3, ECDSA P-256), 13-byte response, 64 connections",
    "6-hs": "6b. HTTPS, a full TLS 1.3 handshake per request (Connection: close), 64 connections",
    "6-idle": "6c. idle TLS keep-alive connections",
    "7": "7. 100,000 routes loaded, as scenario 1",
    "8": "8. edge policy: a 10,000-rule IP deny list and a never-hit rate limit, as scenario 1",
    "9-base": "9a. as scenario 1, just before 9b",
    "9": "9b. as scenario 1 while slow clients are held: slow headers and slow bodies, each reopened when closed",
}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(results):
    """results[scenario][proxy] = [round results] -> medians."""
    summary = {}
    for sc, per in results.items():
        summary[sc] = {}
        for pname, rounds in per.items():
            keys = set().union(*[r.keys() for r in rounds])
            summary[sc][pname] = {k: median([r.get(k) for r in rounds if isinstance(r.get(k), (int, float))]) for k in keys if any(isinstance(r.get(k), (int, float)) for r in rounds)}
            summary[sc][pname]["rounds"] = len(rounds)
    return summary


def ratio(a, b):
    return a / b if a and b else None


def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


RESULTS = {}


def render_markdown(summary, meta):
    L = []
    L.append(f"# Ringway load test, {meta['date']} on {meta['host']}\n")
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Rounds: {ROUNDS} (medians shown), {DURATION} s per run, proxies pinned to CPU {PROXY_CPUS}, load generator and origin on CPU {LOAD_CPUS}, {WORKERS} worker(s) each.  ")
    L.append(f"Kernel {meta['kernel']}; nginx {meta['nginx']}; HAProxy {meta['haproxy']}; Ringway {meta['ringway']}.\n")
    if "origin" in summary:
        o = summary["origin"].get("origin", {})
        L.append(f"Origin alone (scenario 1 shape, no proxy): {fmt(o.get('rps'))} requests/s — the proxies below stay under it, so the origin is not their bottleneck.\n")
    for sc in [s for s in ["1", "2", "3-down", "3-up", "4", "5", "6-ka", "6-hs", "6-idle", "7", "8", "9-base", "9"] if s in summary]:
        L.append(f"## {SCENARIO_TITLES[sc]}\n")
        per = summary[sc]
        ng, ha = per.get("nginx", {}), per.get("haproxy", {})
        if sc == "9":
            L.append(f"{SLOW_HEADER_CONNS} slow-header clients (a header line every 10 s, never the end of the head) and {SLOW_BODY_CONNS} slow-body clients (2 bytes a second of a 1 MB body) held by `ringway-loadgen slow`, each reopened when the proxy closes it; wrk's keep-alive load as in scenario 1 meanwhile.\n")
            L.append("| proxy | requests/s | vs its 9a | vs nginx | p50 / p99 ms | errors | CPU µs/req | RSS KiB | client conns held (median) | upstream conns held (median) | slow-header conns closed by the proxy | slow-body conns closed by the proxy |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            base = summary.get("9-base", {})
            for pname, r in per.items():
                vs_base = median([ratio(a.get("rps"), b.get("rps")) for a, b in zip(RESULTS.get("9", {}).get(pname, []), RESULTS.get("9-base", {}).get(pname, []))])
                L.append(
                    f"| {pname} | {fmt(r.get('rps'))} | {fmt(vs_base, 2)}x | {fmt(ratio(r.get('rps'), ng.get('rps')), 2)}x | {fmt(r.get('p50_ms'), 3)} / {fmt(r.get('p99_ms'), 3)} | {fmt(r.get('errors'), 0)} | {fmt(r.get('cpu_us_per_req'), 2)} | {fmt(r.get('rss_kib'), 0)} | {fmt(r.get('client_conns_held'), 0)} | {fmt(r.get('upstream_conns_held'), 0)} | {fmt(r.get('slow_header_closed_by_proxy'), 0)} | {fmt(r.get('slow_body_closed_by_proxy'), 0)} |"
                )
            L.append("")
            continue
        if sc in ("5", "6-idle"):
            L.append("| proxy | idle connections | RSS before (KiB) | RSS with idle conns (KiB) | KiB per idle connection | vs nginx |")
            L.append("|---|---:|---:|---:|---:|---:|")
            for pname, r in per.items():
                L.append(f"| {pname} | {fmt(r.get('connections'), 0)} | {fmt(r.get('rss_before_kib'), 0)} | {fmt(r.get('rss_idle_kib'), 0)} | {fmt(r.get('kib_per_idle_conn'), 2)} | {fmt(ratio(r.get('kib_per_idle_conn'), ng.get('kib_per_idle_conn')), 2)}x |")
            L.append("")
            continue
        lat = "p50 / p99 / p99.9 ms" if sc == "4" else "p50 / p99 ms"
        L.append(f"| proxy | requests/s | vs nginx | vs HAProxy | {lat} | CPU µs/req | CPU vs nginx | CPU util | RSS KiB | upstream conns / 1k req | errors |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for pname, r in per.items():
            lats = f"{fmt(r.get('p50_ms'), 3)} / {fmt(r.get('p99_ms'), 3)}" + (f" / {fmt(r.get('p999_ms'), 3)}" if sc == "4" else "")
            L.append(
                f"| {pname} | {fmt(r.get('rps'))} | {fmt(ratio(r.get('rps'), ng.get('rps')), 2)}x | {fmt(ratio(r.get('rps'), ha.get('rps')), 2)}x | {lats} | {fmt(r.get('cpu_us_per_req'), 2)} | {fmt(ratio(r.get('cpu_us_per_req'), ng.get('cpu_us_per_req')), 2)}x | {fmt(r.get('cpu_util'), 2)} | {fmt(r.get('rss_kib'), 0)} | {fmt(r.get('upstream_conns_per_1k'), 3)} | {fmt(r.get('errors'), 0)} |"
            )
        if sc == "6-hs":
            L.append("\n| proxy | full handshakes/s per core (1 / CPU per connection) | vs nginx | vs HAProxy |")
            L.append("|---|---:|---:|---:|")
            for pname, r in per.items():
                h = r.get("handshakes_per_core_s")
                L.append(f"| {pname} | {fmt(h, 0)} | {fmt(ratio(h, ng.get('handshakes_per_core_s')), 2)}x | {fmt(ratio(h, ha.get('handshakes_per_core_s')), 2)}x |")
            rw = per.get("ringway", {})
            if rw.get("resumed_fraction") is not None:
                L.append(f"\nRingway's own counters over this run: {fmt(100 * (rw.get('tls13_fraction') or 0), 1)}% TLS 1.3, {fmt(100 * rw['resumed_fraction'], 1)}% resumed (the load generator, `ringway-loadgen handshakes`, never resumes).")
        if sc == "7" and "1" in summary and "ringway" in summary["1"]:
            base = summary["1"]["ringway"].get("rps")
            r = per.get("ringway-100k", {}).get("rps")
            L.append(f"\nWith 100,000 routes Ringway serves {fmt(ratio(r, base), 3)}x its scenario-1 rate (1 route).")
        if sc == "1" and "ringway-baseline" in per and "ringway" in per:
            cur, old = RESULTS.get("1", {}).get("ringway", []), RESULTS.get("1", {}).get("ringway-baseline", [])
            cpu = [ratio(a.get("cpu_us_per_req"), b.get("cpu_us_per_req")) for a, b in zip(cur, old)]
            rps = [ratio(a.get("rps"), b.get("rps")) for a, b in zip(cur, old)]
            spread = lambda xs: f"{fmt(min(xs), 3)}-{fmt(max(xs), 3)}" if xs and None not in xs else "–"  # noqa: E731
            L.append(
                f"\nThis build against the earlier one (`{BASELINE_BIN}`), paired by round: CPU per request {fmt(median(cpu), 3)}x "
                f"(spread {spread(cpu)}), requests/s {fmt(median(rps), 3)}x (spread {spread(rps)}). "
                f"Per round, CPU ratios: {', '.join(fmt(x, 3) for x in cpu)}; CPU µs/req this build: {', '.join(fmt(a.get('cpu_us_per_req'), 2) for a in cur)}; earlier: {', '.join(fmt(b.get('cpu_us_per_req'), 2) for b in old)}."
            )
        if sc == "8" and "ringway" in per and "ringway-policy" in per:
            a, b = per["ringway"], per["ringway-policy"]
            cost = 1 - ratio(b.get("rps"), a.get("rps")) if ratio(b.get("rps"), a.get("rps")) else None
            cpu = ratio(b.get("cpu_us_per_req"), a.get("cpu_us_per_req"))
            pr = [ratio(x.get("rps"), y.get("rps")) for x, y in zip(RESULTS.get("8", {}).get("ringway-policy", []), RESULTS.get("8", {}).get("ringway", []))]
            paired = median(pr)
            L.append(
                f"\nPolicy cost, paired by round (each round runs both back to back, so drift of the shared machine between rounds cancels): "
                f"throughput {fmt(100 * (1 - paired) if paired else None, 2)}% lower (median of the per-round ratios). "
                f"Unpaired, from the medians above: throughput {fmt(100 * cost if cost is not None else None, 2)}% lower, CPU per request {fmt(cpu, 3)}x. "
                f"Per-round throughput ratios (policy / none): {', '.join(fmt(x, 3) for x in pr)}."
            )
        L.append("")
    return "\n".join(L)


def render_svg(summary):
    """Bar chart: Ringway's requests/s and CPU per request relative to nginx and HAProxy."""
    rows = []
    for sc in ["1", "2", "3-down", "3-up", "4", "6-ka", "6-hs", "7"]:
        per = summary.get(sc, {})
        rw = per.get("ringway") or per.get("ringway-100k")
        if not rw:
            continue
        for other in ["nginx", "haproxy"]:
            o = per.get(other)
            if o:
                rows.append((f"S{sc} rps vs {other}", ratio(rw.get("rps"), o.get("rps"))))
                rows.append((f"S{sc} CPU/req vs {other}", ratio(rw.get("cpu_us_per_req"), o.get("cpu_us_per_req"))))
    s5 = summary.get("5", {})
    if "ringway" in s5 and "nginx" in s5:
        rows.append(("S5 KiB/idle conn vs nginx", ratio(s5["ringway"].get("kib_per_idle_conn"), s5["nginx"].get("kib_per_idle_conn"))))
    s6 = summary.get("6-idle", {})
    if "ringway" in s6 and "nginx" in s6:
        rows.append(("S6c KiB/idle TLS conn vs nginx", ratio(s6["ringway"].get("kib_per_idle_conn"), s6["nginx"].get("kib_per_idle_conn"))))
    rows = [(n, v) for n, v in rows if v is not None and v > 0]
    h = 30 + 22 * len(rows) + 30
    w = 760
    x0, scale = 230, 200
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">']
    out.append(f'<text x="10" y="18" font-size="14">Ringway relative to nginx / HAProxy (1.0 = equal; rps: higher is better, CPU and memory: lower is better)</text>')
    for i, (name, v) in enumerate(rows):
        y = 30 + i * 22
        good = v >= 1 if "rps" in name else v <= 1
        color = "#2e7d32" if good else "#c62828"
        out.append(f'<text x="10" y="{y + 14}">{name}</text>')
        out.append(f'<rect x="{x0}" y="{y}" width="{min(v, 2.5) * scale:.1f}" height="16" fill="{color}"/>')
        out.append(f'<text x="{x0 + min(v, 2.5) * scale + 5:.1f}" y="{y + 13}">{v:.2f}x</text>')
    out.append(f'<line x1="{x0 + scale}" y1="26" x2="{x0 + scale}" y2="{h - 20}" stroke="#333" stroke-dasharray="4,3"/>')
    out.append(f'<text x="{x0 + scale - 10}" y="{h - 6}">1.0</text>')
    out.append("</svg>")
    return "\n".join(out)


def version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (FileNotFoundError, IndexError):
        return "?"


def main():
    global WORK, ALL
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d-%H%M")
    host = platform.node() or "host"
    WORK = LT / "results" / "tmp" / stamp
    WORK.mkdir(parents=True, exist_ok=True)
    # One ECDSA P-256 certificate for localhost, served by all three proxies.
    tls = WORK / "tls"
    tls.mkdir(exist_ok=True)
    subprocess.run([str(REL / "ringway"), "dev-cert", "--name", "localhost", "--cert", str(tls / "localhost.crt"), "--key", str(tls / "localhost.key")], check=True, capture_output=True)
    (tls / "localhost.pem").write_text((tls / "localhost.crt").read_text() + (tls / "localhost.key").read_text())
    write_configs(WORK)
    log(f"workdir {WORK}; proxies on CPU {PROXY_CPUS}, load on CPU {LOAD_CPUS}; {ROUNDS} rounds x {DURATION}s")

    origin = Proxy("origin", taskset(LOAD_CPUS, [str(REL / "ringway-origin"), "--listen", f"127.0.0.1:{ORIGIN_PORT}", "--threads", str(len(cpu_list(LOAD_CPUS))), "--cores", LOAD_CPUS]), ORIGIN_PORT)
    ALL = {
        "ringway": Proxy("ringway", taskset(PROXY_CPUS, [str(REL / "ringway"), "serve", "--config", str(WORK / "ringway.toml")]), RW_PORT),
        "nginx": Proxy("nginx", taskset(PROXY_CPUS, ["nginx", "-c", str(WORK / "nginx.conf")]), NG_PORT),
        "haproxy": Proxy("haproxy", taskset(PROXY_CPUS, ["haproxy", "-f", str(WORK / "haproxy.cfg")]), HA_PORT),
        "ringway-100k": Proxy("ringway-100k", taskset(PROXY_CPUS, [str(REL / "ringway"), "serve", "--config", str(WORK / "ringway-100k.toml")]), RW100K_PORT),
        "ringway-policy": Proxy("ringway-policy", taskset(PROXY_CPUS, [str(REL / "ringway"), "serve", "--config", str(WORK / "ringway-policy.toml")]), RWPOL_PORT),
    }
    if BASELINE_BIN:
        ALL["ringway-baseline"] = Proxy("ringway-baseline", taskset(PROXY_CPUS, [BASELINE_BIN, "serve", "--config", str(WORK / "ringway-baseline.toml")]), RWBASE_PORT)
    proxies = [p for p in PROXIES if p in ALL]
    started = [origin]
    results = {}
    try:
        origin.start(WORK)
        extra = (["ringway-100k"] if "7" in SCENARIOS else []) + (["ringway-policy"] if "8" in SCENARIOS else []) + (["ringway-baseline"] if BASELINE_BIN and "1" in SCENARIOS else [])
        if "8" in SCENARIOS and "ringway" not in proxies:
            extra.append("ringway")
        for pname in proxies + extra:
            ALL[pname].start(WORK)
            started.append(ALL[pname])
        # Warm up every proxy (pools, buffers, page cache).
        for pname in proxies + [e for e in extra if e != "ringway-100k"]:
            subprocess.run(taskset(LOAD_CPUS, ["wrk", "-t1", "-c64", "-d2s", "-H", "Host: localhost", f"http://127.0.0.1:{ALL[pname].port}/"]), capture_output=True)
        nginx_max = None
        for rnd in range(1, ROUNDS + 1):
            log(f"round {rnd}/{ROUNDS}")
            o = measure([origin.proc.pid], lambda: run_wrk(ORIGIN_PORT))
            results.setdefault("origin", {}).setdefault("origin", []).append(o)
            for sc in SCENARIOS:
                if sc in ("3", "6", "9"):
                    subs = {"3": ["3-down", "3-up"], "6": ["6-ka", "6-hs", "6-idle"], "9": ["9-base", "9"]}[sc]
                    for sub in subs:
                        for pname, r in scenario_runs(sub, proxies, nginx_max).items():
                            results.setdefault(sub, {}).setdefault(pname, []).append(r)
                            log(f"  S{sub} {pname}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k in ("rps", "cpu_us_per_req", "handshakes_per_core_s", "kib_per_idle_conn", "errors")))
                    continue
                if sc == "4" and nginx_max is None:
                    s1 = results.get("1", {}).get("nginx") or results.get("1", {}).get(proxies[0])
                    nginx_max = median([r["rps"] for r in s1]) if s1 else 20000
                # Scenario 8 alternates which instance goes first, so drift favours neither.
                pair = ["ringway", "ringway-policy"] if rnd % 2 else ["ringway-policy", "ringway"]
                run_on = ["ringway-100k"] if sc == "7" else pair if sc == "8" else proxies
                if sc == "1" and BASELINE_BIN:
                    # Paired with the earlier build, which goes first every other round.
                    run_on = (["ringway-baseline"] + proxies) if rnd % 2 == 0 else (proxies + ["ringway-baseline"])
                for pname, r in scenario_runs(sc, run_on, nginx_max).items():
                    results.setdefault(sc, {}).setdefault(pname, []).append(r)
                    log(f"  S{sc} {pname}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k in ("rps", "cpu_us_per_req", "p99_ms", "kib_per_idle_conn", "errors")))
            # Once per round, every scenario has run for every proxy: the next round repeats.
    finally:
        for p in reversed(started):
            p.stop()

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": host,
        "kernel": platform.release(),
        "nginx": version(["nginx", "-v"]),
        "haproxy": version(["haproxy", "-v"]),
        "ringway": version([str(REL / "ringway"), "--version"]),
        "ringway_baseline": BASELINE_BIN or None,
        "command": os.environ.get("LOADTEST_COMMAND", "loadtest/run.sh"),
        "rounds": ROUNDS,
        "duration_s": DURATION,
        "proxy_cpus": PROXY_CPUS,
        "load_cpus": LOAD_CPUS,
    }
    global RESULTS
    RESULTS = results
    summary = summarize(results)
    md = render_markdown(summary, meta)
    print(md)
    outdir = LT / "results"
    # RESULTS_NAME keeps a partial run (SCENARIOS=6, say) from replacing the day's full one.
    base = outdir / os.environ.get("RESULTS_NAME", f"{stamp[:10]}-{host}")
    (base.with_suffix(".md")).write_text(md + "\n")
    (base.with_suffix(".json")).write_text(json.dumps({"meta": meta, "summary": summary, "rounds": results}, indent=1))
    (base.with_suffix(".svg")).write_text(render_svg(summary))
    log(f"wrote {base}.md, .json, .svg")
    shutil.rmtree(WORK / "nginx-body", ignore_errors=True)


if __name__ == "__main__":
    main()
