#!/usr/bin/env python3
"""Heap per idle tunnel by how it was opened: a first-request CONNECT (`connect`), a CONNECT sent
on a connection that carried a plain-HTTP request first (`http-connect`), and a WebSocket-style
upgrade answered 101 (`ws`). Exact: the proxy's own `tunnelgate_memory_in_use_bytes` before and
after opening N idle tunnels (after 50 warm-up tunnels), so the figure does not depend on what else
runs on the machine. Loopback only.

    cargo build --release -p tunnelgate-proxy
    python3 bench/upgraded_idle.py [N]          # N = 2000 by default; prints one line per kind
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream():
    """Answers GETs on keep-alive, 101 to an upgrade, and nothing to a tunnel: every tunnel idles."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    held = []

    def handle(c):
        while True:
            data = b""
            while b"\r\n\r\n" not in data:
                d = c.recv(4096)
                if not d:
                    return
                data += d
            if b"Upgrade" in data:
                c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                return
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def serve():
        while True:
            c, _ = srv.accept()
            held.append(c)
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def head(s):
    d = b""
    while not d.endswith(b"\r\n\r\n"):
        x = s.recv(1)
        if not x:
            raise RuntimeError(f"closed after {d!r}")
        d += x
    assert b" 200 " in d.split(b"\r\n")[0] or b" 101 " in d.split(b"\r\n")[0], d
    return d


def open_one(kind, proxy, up):
    s = socket.create_connection(("127.0.0.1", proxy))
    target = f"127.0.0.1:{up}"
    if kind == "http-connect":
        s.sendall(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head(s)
        s.recv(2)
    if kind in ("connect", "http-connect"):
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    else:
        s.sendall(f"GET http://{target}/ws HTTP/1.1\r\nHost: {target}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode())
    head(s)
    return s


def heap(admin):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    return int(float(next(l for l in text.splitlines() if l.startswith("tunnelgate_memory_in_use_bytes ")).split()[1]))


def main():
    up = upstream()
    for kind in ("connect", "http-connect", "ws"):
        port, admin = free_port(), free_port()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as cfg:
            cfg.write(f"""version: 1
listeners: [{{name: forward, bind: '127.0.0.1:{port}'}}]
admin: {{bind: '127.0.0.1:{admin}'}}
policy:
  rules: [{{name: loopback, action: allow, cidrs: ['127.0.0.1/32']}}]
relay: {{idleTimeout: 10m}}
limits: {{maxConnections: 100000, maxConnectionsPerClient: 100000, drainDelay: 0s, drainTimeout: 1s}}
logging: {{accessLog: false}}
""")
            cfg.flush()
            proxy = subprocess.Popen([os.path.join(ROOT, "target/release/tunnelgate-proxy"), "--config", cfg.name],
                                     stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)
                warm = [open_one(kind, port, up) for _ in range(50)]
                time.sleep(1)
                before = heap(admin)
                held = [open_one(kind, port, up) for _ in range(N)]
                time.sleep(2)
                after = heap(admin)
                print(f"{kind}: {(after - before) / N:,.0f} B of heap per idle tunnel ({N} tunnels)")
                for s in warm + held:
                    s.close()
            finally:
                proxy.terminate()
                proxy.wait()


if __name__ == "__main__":
    main()
