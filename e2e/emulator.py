"""A Kubernetes API emulator, kept for one use: the propagation benchmark (bench/propagation.py),
which loads up to 100,000 pods and 10,000 policies and reads the emulator's own write counters
(/_emulator/stats). No test uses it any more: every end-to-end test runs against a real
kube-apiserver and etcd (controlplane/, e2e/src/controlplane.rs), and the benchmark's 2,000- and
10,000-pod rows run against both (`--api real`). It serves the 100,000- and 150,000-pod rows: on
these 2-core machines the real server takes minutes to load that many pods (two etcd writes each)
and GiBs for its watch cache, beside the operator, the proxy and the load being measured.

kmock (PyPI, pinned in requirements.txt) serves HTTP and parses Kubernetes paths; this shim adds
what kube-rs needs and kmock 0.8 lacks: resourceVersion, uid, generation and creationTimestamp on
objects; label and field selectors on list and watch; watches that resume from a resourceVersion;
`NotFound`/`AlreadyExists`/`Conflict` reasons; server-side apply that creates a missing object;
PUT replace with optimistic concurrency; field ownership just deep enough for server-side apply
conflicts (an apply without force that changes a field another manager set gets 409 Conflict, which
is what leader election through a Lease relies on); the status subresource changing only status (and main
patches leaving status alone); and no watch event for a patch that changes nothing.

What it does NOT emulate (covered by the kind suite): schema/CEL admission, the full SSA field
ownership model (managedFields, list merge keys, field removal on re-apply), RBAC, admission webhooks, garbage collection, kubelet behaviour.

Usage: python emulator.py --port-file PATH   (writes the bound port, serves until killed)
"""

import argparse
import asyncio
import copy
import datetime
import json
import os
import signal
import uuid

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import parsing, rendering

# kmock 0.8 reads /api/v1/namespaces[/NAME] as a namespace prefix with no resource and fails;
# those paths are the cluster-scoped Namespace resource.
_parse_path = parsing.parse_path


def parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _parse_path(path)


parsing.parse_path = parse_path

# Resources whose status is a subresource: a main-resource write never changes their status.
STATUS_SUBRESOURCE = {("tunnelgate.io", "tunnelpolicies"), ("tunnelgate.io", "clustertunnelpolicies"), ("", "pods"), ("apps", "deployments"), ("apps", "daemonsets")}

KINDS = {
    "configmaps": "ConfigMap", "secrets": "Secret", "pods": "Pod", "namespaces": "Namespace",
    "leases": "Lease", "events": "Event", "tunnelpolicies": "TunnelPolicy", "services": "Service",
    "clustertunnelpolicies": "ClusterTunnelPolicy",
}


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_error(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "code": code, "reason": reason, "message": message,
    }, status=code)


def merge(target, patch):
    """RFC 7386 JSON merge patch (null deletes)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def leaves(obj, prefix=()):
    """(path, value) of every leaf of a JSON object; lists are leaves."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from leaves(v, prefix + (k,))
    else:
        yield prefix, obj


def get_path(obj, path):
    cur = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


IGNORED_FIELDS = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"), ("metadata", "resourceVersion")}


def parse_label_selector(s: str):
    """Returns a predicate over a labels dict for =, ==, !=, in, notin, exists, !exists."""
    terms = []
    depth, cur = 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur.strip())
    preds = []
    for t in terms:
        if " notin " in t:
            k, vs = t.split(" notin ", 1)
            vals = {v.strip() for v in vs.strip().strip("()").split(",")}
            preds.append(lambda l, k=k.strip(), vals=vals: l.get(k) not in vals)
        elif " in " in t:
            k, vs = t.split(" in ", 1)
            vals = {v.strip() for v in vs.strip().strip("()").split(",")}
            preds.append(lambda l, k=k.strip(), vals=vals: l.get(k) in vals)
        elif "!=" in t:
            k, v = t.split("!=", 1)
            preds.append(lambda l, k=k.strip(), v=v.strip(): l.get(k) != v)
        elif "==" in t or "=" in t:
            k, v = t.split("==", 1) if "==" in t else t.split("=", 1)
            preds.append(lambda l, k=k.strip(), v=v.strip(): l.get(k) == v)
        elif t.startswith("!"):
            preds.append(lambda l, k=t[1:].strip(): k not in l)
        else:
            preds.append(lambda l, k=t: k in l)
    return lambda labels: all(p(labels) for p in preds)


def field_value(obj, path: str):
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def parse_field_selector(s: str):
    preds = []
    for t in filter(None, (x.strip() for x in s.split(","))):
        if "!=" in t:
            k, v = t.split("!=", 1)
            preds.append(lambda o, k=k, v=v: str(field_value(o, k) or "") != v)
        else:
            k, v = t.split("==", 1) if "==" in t else t.split("=", 1)
            preds.append(lambda o, k=k, v=v: str(field_value(o, k) or "") == v)
    return lambda obj: all(p(obj) for p in preds)


class Shim(kmock.KubernetesEmulator):
    """kmock's server and parsing with an object store that behaves like the API server."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store: dict = {}  # (group, version, plural, namespace, name) -> object
        self.rv = 0
        self.log: list = []  # (rv, (group, version, plural), type, object)
        self.changed = asyncio.Condition()
        self.owners: dict = {}  # object key -> {field path: field manager}
        # Writes by (verb, plural, subresource), for the propagation benchmark's "status writes
        # per change": GET /_emulator/stats.
        self.writes: dict = {}

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        # kmock keeps every request for assertions this shim never makes; at benchmark scale
        # (tens of thousands of writes) that history only costs memory and time.
        self._requests.clear()
        if raw.path == "/_emulator/stats":
            return aiohttp.web.json_response({"/".join(k): v for k, v in sorted(self.writes.items())})
        if raw.path.rstrip("/") == "/apis/networking.k8s.io/v1":
            # Discovery, as a Kubernetes 1.33+ API server answers it (ServiceCIDR is GA there).
            return aiohttp.web.json_response({
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "networking.k8s.io/v1",
                "resources": [{"name": "servicecidrs", "singularName": "servicecidr", "namespaced": False,
                               "kind": "ServiceCIDR", "verbs": ["get", "list", "watch", "create", "delete"]}],
            })
        if request.resource is None:
            return await super()._handle(request)
        res = (request.resource.group or "", request.resource.version, request.resource.plural)
        ns, name, subresource, data = request.namespace, request.name, request.subresource, request.data
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        params = dict(request.params)
        if method in ("POST", "PATCH", "PUT", "DELETE"):
            k = (method, res[2], subresource or "")
            self.writes[k] = self.writes.get(k, 0) + 1
        try:
            if method == "GET" and name is None:
                if params.get("watch") in ("true", "1"):
                    return await self.watch(res, ns, params, raw)
                return self.list(res, ns, params)
            if method == "GET":
                return self.get(res, ns, name)
            if method == "POST":
                return await self.create(res, ns, data or {})
            if method == "PATCH":
                ctype = request.headers.get("Content-Type", "").split(";")[0]
                manager = params.get("fieldManager", "unknown")
                force = params.get("force") == "true"
                return await self.patch(res, ns, name, data, ctype, subresource, manager, force)
            if method == "PUT":
                return await self.replace(res, ns, name, data or {}, subresource)
            if method == "DELETE":
                return await self.delete(res, ns, name)
        except Exception as e:  # surfaced to the client as a 500 Status, like a real server bug would be
            return status_error(500, "InternalError", repr(e))
        return status_error(405, "MethodNotAllowed", f"{method} is not supported")

    # -- helpers ---------------------------------------------------------------------------
    def key(self, res, ns, name):
        return (*res, ns or "", name)

    def decorate(self, res, obj):
        group, version, plural = res
        obj.setdefault("apiVersion", f"{group}/{version}" if group else version)
        obj.setdefault("kind", KINDS.get(plural, plural.rstrip("s").capitalize()))
        return obj

    async def record(self, res, type_, obj):
        self.log.append((self.rv, res, type_, copy.deepcopy(obj)))
        async with self.changed:
            self.changed.notify_all()

    def selected(self, obj, ns, params):
        meta = obj.get("metadata", {})
        if ns and meta.get("namespace") != ns:
            return False
        if params.get("labelSelector") and not parse_label_selector(params["labelSelector"])(meta.get("labels") or {}):
            return False
        if params.get("fieldSelector") and not parse_field_selector(params["fieldSelector"])(obj):
            return False
        return True

    # -- verbs -----------------------------------------------------------------------------
    def list(self, res, ns, params):
        items = [copy.deepcopy(o) for k, o in sorted(self.store.items()) if k[:3] == res and self.selected(o, ns, params)]
        kind = KINDS.get(res[2], "Object") + "List"
        api_version = f"{res[0]}/{res[1]}" if res[0] else res[1]
        return aiohttp.web.json_response({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    def get(self, res, ns, name):
        obj = self.store.get(self.key(res, ns, name))
        if obj is None:
            return status_error(404, "NotFound", f'{res[2]} "{name}" not found')
        return aiohttp.web.json_response(obj)

    async def create(self, res, ns, body, *, status_allowed=True):
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            return status_error(422, "Invalid", "metadata.name is required")
        if ns:
            meta["namespace"] = ns
        key = self.key(res, meta.get("namespace"), meta["name"])
        if key in self.store:
            return status_error(409, "AlreadyExists", f'{res[2]} "{meta["name"]}" already exists')
        self.rv += 1
        meta.update({"uid": str(uuid.uuid4()), "resourceVersion": str(self.rv), "generation": 1, "creationTimestamp": now()})
        meta.pop("managedFields", None)
        self.store[key] = self.decorate(res, obj)
        await self.record(res, "ADDED", obj)
        return aiohttp.web.json_response(obj, status=201)

    async def write(self, res, key, old, new, subresource):
        """Stores `new` in place of `old` following status-subresource rules; returns the object."""
        has_status_sub = (res[0], res[2]) in STATUS_SUBRESOURCE
        if subresource == "status":
            # The status subresource changes only status.
            result = copy.deepcopy(old)
            if new.get("status") is None:
                result.pop("status", None)
            else:
                result["status"] = copy.deepcopy(new["status"])
        else:
            result = copy.deepcopy(new)
            if has_status_sub:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
        # Identity and bookkeeping are the server's, whatever the client sent.
        for f in ("uid", "creationTimestamp", "resourceVersion", "generation", "namespace", "name"):
            if f in old.get("metadata", {}):
                result.setdefault("metadata", {})[f] = old["metadata"][f]
        result.get("metadata", {}).pop("managedFields", None)
        if result == old:
            return old  # no change: no new resourceVersion, no watch event
        self.rv += 1
        meta = result["metadata"]
        meta["resourceVersion"] = str(self.rv)
        strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}
        if strip(result) != strip(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self.store[key] = self.decorate(res, result)
        await self.record(res, "MODIFIED", result)
        return result

    def own(self, key, body, manager):
        """Records `manager` as the owner of every field `body` sets (and drops cleared ones)."""
        owners = self.owners.setdefault(key, {})
        for path, value in leaves(body or {}):
            if path in IGNORED_FIELDS:
                continue
            if value is None:
                owners.pop(path, None)
            else:
                owners[path] = manager

    def conflicts(self, key, old, body, manager):
        owners = self.owners.get(key, {})
        out = []
        for path, value in leaves(body or {}):
            if path in IGNORED_FIELDS or value is None:
                continue
            owner = owners.get(path)
            if owner not in (None, manager) and get_path(old, path) is not None and get_path(old, path) != value:
                out.append((".".join(path), owner))
        return out

    async def patch(self, res, ns, name, body, ctype, subresource, manager="unknown", force=False):
        key = self.key(res, ns, name)
        old = self.store.get(key)
        apply = ctype == "application/apply-patch+yaml"
        if old is None:
            if apply and subresource is None:
                body = copy.deepcopy(body or {})
                body.setdefault("metadata", {})["name"] = name
                resp = await self.create(res, ns, body)
                self.own(key, body, manager)
                return resp
            return status_error(404, "NotFound", f'{res[2]} "{name}" not found')
        if apply and not force:
            clash = self.conflicts(key, old, body, manager)
            if clash:
                what = ", ".join(f"{p} (owned by {o})" for p, o in clash)
                return status_error(409, "Conflict", f"Apply failed with conflicts: {what}")
        if ctype != "application/json-patch+json":
            self.own(key, body, manager)
        if ctype == "application/json-patch+json":
            new = jsonpatch.apply_patch(old, body or [])
        else:  # merge, strategic merge (approximated) and apply (approximated as a merge)
            new = merge(old, body or {})
        result = await self.write(res, key, old, new, subresource)
        return aiohttp.web.json_response(result)

    async def replace(self, res, ns, name, body, subresource):
        key = self.key(res, ns, name)
        old = self.store.get(key)
        if old is None:
            return status_error(404, "NotFound", f'{res[2]} "{name}" not found')
        want = (body.get("metadata") or {}).get("resourceVersion")
        if want and want != old["metadata"]["resourceVersion"]:
            return status_error(409, "Conflict", f'Operation cannot be fulfilled on {res[2]} "{name}": the object has been modified')
        result = await self.write(res, key, old, copy.deepcopy(body), subresource)
        return aiohttp.web.json_response(result)

    async def delete(self, res, ns, name):
        key = self.key(res, ns, name)
        obj = self.store.pop(key, None)
        if obj is None:
            return status_error(404, "NotFound", f'{res[2]} "{name}" not found')
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        await self.record(res, "DELETED", obj)
        return aiohttp.web.json_response(obj)

    async def watch(self, res, ns, params, raw):
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(raw)
        since = params.get("resourceVersion")
        timeout = float(params.get("timeoutSeconds") or 300)
        deadline = asyncio.get_running_loop().time() + timeout
        if not since or since == "0":
            # Start from now, after the current objects as synthetic ADDED events.
            start = self.rv
            for k, o in sorted(self.store.items()):
                if k[:3] == res and self.selected(o, ns, params):
                    await resp.write((json.dumps({"type": "ADDED", "object": o}) + "\n").encode())
        else:
            start = int(since)
        pos = 0
        try:
            while True:
                while pos < len(self.log):
                    rv, r, type_, obj = self.log[pos]
                    pos += 1
                    if rv > start and r == res and self.selected(obj, ns, params):
                        await resp.write((json.dumps({"type": type_, "object": obj}) + "\n").encode())
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                async with self.changed:
                    try:
                        await asyncio.wait_for(self.changed.wait_for(lambda: pos < len(self.log)), timeout=left)
                    except asyncio.TimeoutError:
                        break
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        return resp


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (a bridge address when pods run in network namespaces)")
    ap.add_argument("--port-file", required=True)
    args = ap.parse_args()
    async with Shim() as handler, kmock.Server(handler, host=args.host, port=args.port or None) as server:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.port))
        os.replace(args.port_file + ".tmp", args.port_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
