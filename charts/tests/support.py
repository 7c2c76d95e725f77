"""What the chart's end-to-end tests share: loopback ports, the workspace binaries a container's
command names, the kubelet's $(VAR) expansion and field references, a CONNECT client, plain HTTP
probes, and waiting for a condition."""

import itertools
import os
import pathlib
import re
import socket
import time
import urllib.error
import urllib.request

from cluster import target_binary

NS = "tunnelgate"


_next_port = itertools.count((os.getpid() * 7919) % 20000)


def free_port() -> int:
    """A port for a server started later. Taken below the kernel's ephemeral range, so an outgoing
    connection cannot take it before the server binds it (a port from bind(:0) can)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = 10000
    while True:
        port = first + next(_next_port) % (low - first) if low > first + 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]


def binary(container_command: str) -> pathlib.Path:
    """The workspace binary a container's command names."""
    return target_binary(pathlib.Path(container_command).name)


def expand(args, env):
    """Kubernetes expands $(VAR) in args from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def container_env(container, pod_name):
    env = {}
    for e in container.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = {"metadata.namespace": NS, "metadata.name": pod_name}.get(field, e.get("value", ""))
    return env


def connect(client_ip, proxy, target):
    """A CONNECT from `client_ip` through `proxy` (host, port): the socket and the response head
    (empty when the proxy closed first). Raises OSError when the proxy cannot be reached."""
    s = socket.socket()
    s.settimeout(5)
    try:
        s.bind((client_ip, 0))
        s.connect(proxy)
        s.sendall(f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                break
            head += chunk
        return s, head
    except OSError:
        s.close()
        raise


def status_of(head):
    return int(head.split(b" ")[1]) if head else 0


def connect_status(client_ip, proxy_port, target, proxy_host="127.0.0.1"):
    try:
        s, head = connect(client_ip, (proxy_host, proxy_port), target)
    except OSError:
        return 0
    s.close()
    return status_of(head)


def until(what, secs, f):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if f():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def http_status(port, path, host="127.0.0.1"):
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
