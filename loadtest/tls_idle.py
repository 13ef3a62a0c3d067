#!/usr/bin/env python3
"""Holds N idle TLS keep-alive connections to a proxy (loadtest scenario 6c).

    tls_idle.py HOST:PORT SNI --connections N --hold-seconds S

Each connection completes a full handshake (no resumption), sends one request and reads its
response, then stays open and silent. Prints `ready` once every connection has been answered,
then a JSON line after the hold time (or on SIGTERM). The load test reads the proxy's RSS
while the connections are held.
"""

import argparse
import json
import signal
import socket
import ssl
import sys
import time

CONNECT_TIMEOUT_S = 10


def read_response(s):
    """Reads one response with a Content-Length body; returns whether it was complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(16384)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = s.recv(16384)
        if not chunk:
            return False
        body += chunk
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("sni")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--hold-seconds", type=float, default=30)
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    req = f"GET / HTTP/1.1\r\nHost: {a.sni}\r\n\r\n".encode()
    held, errors, versions = [], 0, {}
    for _ in range(a.connections):
        try:
            raw = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
            s = ctx.wrap_socket(raw, server_hostname=a.sni)
            s.sendall(req)
            if not read_response(s):
                raise OSError("no response")
            versions[s.version()] = versions.get(s.version(), 0) + 1
            held.append(s)
        except OSError:
            errors += 1
    print("ready", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    end = time.time() + a.hold_seconds
    while not stop and time.time() < end:
        time.sleep(0.1)
    print(json.dumps({"connected": len(held), "errors": errors, "versions": versions}), flush=True)
    for s in held:
        s.close()


if __name__ == "__main__":
    sys.exit(main())
