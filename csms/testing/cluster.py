"""N real ``twistd csms`` nodes on one database behind a real HAProxy, for tests and benchmarks.

Everything listens on 127.0.0.1: each node on ports the kernel picks (read back from its log), HAProxy
on two free ports, with a config generated from the shipped ``etc/haproxy.cfg`` (same frontends,
backends, timeouts and health checks; only the addresses change). The nodes read the PROXY protocol
header HAProxy sends, as the shipped file expects. :meth:`Cluster.stop` ends every process it started
(SIGTERM, then SIGKILL after a bound), and the children die with the process that started them.

Usage (on the Twisted reactor)::

    cluster = Cluster(tmp_path, database_url, nodes=3, extra_config=cluster_settings())
    try:
        await cluster.start()
        ... ws://127.0.0.1:{cluster.ocpp_port}/ocpp/CP-1, http://127.0.0.1:{cluster.api_port}/api/v1 ...
        await cluster.kill(cluster.nodes[0])
    finally:
        await cluster.stop()
"""
from __future__ import annotations

import dataclasses
import json as jsonlib
import os
import shutil
import socket
import textwrap

from twisted.internet import defer, task

from csms.testing.processes import DEADLINE, WatchedProcess, die_with_parent, listening_port, run_twistd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The shipped HAProxy config, the template of every generated one.
TEMPLATE = os.path.join(ROOT, "etc", "haproxy.cfg")
#: The bearer token every harness node accepts.
TOKEN = "cluster-token-0123456789abcdef"
OCPP_FRONTEND, API_FRONTEND = "ocpp", "api"
OCPP_BACKEND, API_BACKEND = "csms_ocpp", "csms_api"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)


def cluster_settings(extra: str = "") -> str:
    """The ``[cluster]`` section for each node (``{name}`` is the node's name); ``extra``: more of its settings."""
    return "[cluster]\nenabled = true\nnode_name = {name}\n" + extra


def free_port() -> int:
    """A loopback port nothing listens on now (HAProxy binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sections(text: str) -> list[tuple[str, list[str]]]:
    """HAProxy config text as (header line, body lines) in order; the lines before any header come first."""
    result: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            result.append((line, []))
        else:
            result[-1][1].append(line)
    return result


def connection_cap() -> int:
    """The most connections HAProxy can take under this process's open-files hard limit (two sockets each)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1_000_000 if hard == resource.RLIM_INFINITY else max(100, (hard - 200) // 2)


def raise_open_files_limit() -> None:
    """This process's open-files soft limit up to its hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def haproxy_config(template: str, ocpp_port: int, api_port: int, nodes: list["Node"],
                   max_connections: int | None = None) -> str:
    """``template`` (the shipped etc/haproxy.cfg) with its frontends bound to these loopback ports, its
    backends' servers replaced by ``nodes`` and every ``maxconn`` at most ``max_connections`` (HAProxy
    refuses to start when the open-files limit cannot hold them); everything else (timeouts, checks,
    balance) is kept."""
    binds = {f"frontend {OCPP_FRONTEND}": ocpp_port, f"frontend {API_FRONTEND}": api_port}
    servers = {
        f"backend {OCPP_BACKEND}": [f"    server {n.name} 127.0.0.1:{n.ocpp_port} port {n.api_port}" for n in nodes],
        f"backend {API_BACKEND}": [f"    server {n.name} 127.0.0.1:{n.api_port} cookie {n.name}" for n in nodes],
    }
    out, seen = [], set()
    for header, body in sections(template):
        if header:
            out.append(header)
        key = header.strip()
        for line in body:
            word = line.split()[0] if line.strip() else ""
            if key in binds and word == "bind":
                line = f"    bind 127.0.0.1:{binds[key]}"
            elif key in servers and word == "server":
                continue
            elif word == "maxconn" and max_connections is not None and int(line.split()[1]) > max_connections:
                line = line.replace(line.split()[1], str(max_connections), 1)
            out.append(line)
        if key in servers:
            while out and not out[-1].strip():
                out.pop()
            out.extend(servers[key] + [""])
        seen.add(key)
    missing = (set(binds) | set(servers)) - seen
    if missing:
        raise ValueError(f"the HAProxy template lacks {', '.join(sorted(missing))}")
    return "\n".join(out) + "\n"


@dataclasses.dataclass
class Node:
    name: str
    directory: str
    config_file: str
    process: WatchedProcess | None = None
    ocpp_port: int | None = None
    api_port: int | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/api/v1"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.status is None


class Cluster:
    """``nodes`` ``twistd csms`` processes on ``database_url`` behind one HAProxy (see the module docstring).

    ``extra_config`` is appended to each node's config after ``str.format(name=...)`` (see
    :func:`cluster_settings`); ``plugins`` is ``[plugins] enabled``.
    """

    def __init__(self, directory, database_url: str, nodes: int = 3, extra_config: str = "",
                 plugins: str = "core", template: str = TEMPLATE, reactor=None, deadline: float = DEADLINE,
                 pool_size: int = 4):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.directory = str(directory)
        self.database_url = database_url
        self.extra_config = extra_config
        self.plugins = plugins
        self.template = template
        self.deadline = deadline
        self.pool_size = pool_size
        self.nodes = [self._node(f"node{i + 1}") for i in range(nodes)]
        self.haproxy: WatchedProcess | None = None
        self.ocpp_port: int | None = None
        self.api_port: int | None = None

    # -- configuration ---------------------------------------------------------------------------------

    def _node(self, name: str) -> Node:
        directory = os.path.join(self.directory, name)
        os.makedirs(directory, exist_ok=True)
        return Node(name, directory, os.path.join(directory, "csms.ini"))

    def node_config(self, node: Node) -> str:
        # Every simulated station comes from 127.0.0.1: the per-address limit would count them all as one.
        return textwrap.dedent(f"""\
            [csms]
            shutdown_grace = 5
            [ocpp]
            endpoint = haproxy:tcp:0:interface=127.0.0.1
            max_connections_per_address = 0
            [api]
            endpoint = tcp:0:interface=127.0.0.1
            tokens = {TOKEN}
            [database]
            url = {self.database_url}
            auto_upgrade = true
            pool_size = {self.pool_size}
            [plugins]
            enabled = {self.plugins}
            """) + self.extra_config.format(name=node.name)

    @property
    def ocpp_url(self) -> str:
        return f"ws://127.0.0.1:{self.ocpp_port}/ocpp/"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/api/v1"

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the nodes (the first alone: it applies the migrations), then HAProxy in front of them."""
        raise_open_files_limit()  # the nodes and HAProxy inherit it: each connection is a file descriptor
        first, *others = self.nodes
        await self.start_node(first)
        await defer.gatherResults([defer.ensureDeferred(self.start_node(n)) for n in others], consumeErrors=True)
        await self.start_haproxy()

    async def start_node(self, node: Node) -> None:
        with open(node.config_file, "w", encoding="utf-8") as f:
            f.write(self.node_config(node))
        node.process = run_twistd(node.config_file, node.directory, reactor=self.reactor, deadline=self.deadline)
        log = await node.process.logged("Central System ready")
        node.ocpp_port = listening_port(log, "OCPP 1.6J endpoint")
        node.api_port = listening_port(log, "Operator API")

    async def start_haproxy(self) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy)")
        with open(self.template, encoding="utf-8") as f:
            template = f.read()
        self.ocpp_port, self.api_port = free_port(), free_port()
        path = os.path.join(self.directory, "haproxy.cfg")
        with open(path, "w", encoding="utf-8") as f:
            f.write(haproxy_config(template, self.ocpp_port, self.api_port, self.nodes, connection_cap()))
        self.haproxy = WatchedProcess(self.reactor, self.deadline)
        argv = die_with_parent([binary, "-db", "-f", path])
        self.reactor.spawnProcess(self.haproxy, argv[0], argv, env=dict(os.environ), path=self.directory)
        # HAProxy says nothing once it listens: try its ports until they answer, within the deadline.
        await self.until(lambda: self.answers(self.api_url + "/openapi.json"), "HAProxy to serve the API")

    async def until(self, probe, what: str, interval: float = 0.1) -> None:
        """Run ``probe`` (async, returns a bool) until it is true; fail after the deadline."""
        deadline = self.reactor.seconds() + self.deadline
        while True:
            if self.haproxy is not None and self.haproxy.status is not None:
                raise RuntimeError(f"haproxy ended ({self.haproxy.status}):\n{self.haproxy.stdout}{self.haproxy.stderr}")
            if await probe():
                return
            if self.reactor.seconds() > deadline:
                raise TimeoutError(f"waited {self.deadline} s for {what}")
            await task.deferLater(self.reactor, interval, lambda: None)

    async def answers(self, url: str) -> bool:
        import treq

        try:
            response = await treq.get(url, timeout=5, reactor=self.reactor)
            await treq.content(response)
        except Exception:  # noqa: BLE001 - not up yet: refused, reset or timed out
            return False
        return response.code < 500

    async def kill(self, node: Node) -> int:
        """SIGKILL ``node`` (a crash: no goodbye to its stations or the database); fires once it is gone."""
        node.process.signal("KILL")
        return await node.process.finished()

    async def stop(self) -> None:
        """Stop HAProxy and every node still running; bounded, whatever state the run left them in."""
        processes = [p for p in [self.haproxy] + [n.process for n in self.nodes] if p is not None]
        await defer.DeferredList([p.stop() for p in processes], consumeErrors=True)
        self.write_logs()

    def write_logs(self) -> None:
        """Each process's output to a file in its directory (``node1/twistd.log``, ``haproxy.log``)."""
        named = [(os.path.join(n.directory, "twistd.log"), n.process) for n in self.nodes]
        named.append((os.path.join(self.directory, "haproxy.log"), self.haproxy))
        for path, process in named:
            if process is not None:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(process.stdout + process.stderr)

    # -- asking the nodes ------------------------------------------------------------------------------

    async def api(self, method: str, path: str, json=None, node: Node | None = None, timeout: float = 30):
        """One API request through HAProxy, or to ``node`` directly: (status, parsed JSON body or None)."""
        import treq

        url = (node.api_url if node is not None else self.api_url) + path
        headers = {"Authorization": [f"Bearer {TOKEN}"]}
        data = None
        if json is not None:
            data = jsonlib.dumps(json).encode()
            headers["Content-Type"] = ["application/json"]
        response = await treq.request(method, url, data=data, headers=headers, timeout=timeout, reactor=self.reactor)
        content = await treq.content(response)
        body = jsonlib.loads(content) if content and content.lstrip()[:1] in (b"{", b"[") else None
        return response.code, body

    async def holder(self, station_id: str) -> Node | None:
        """The node the station is connected to, as a live node's API says (its station view's ``node``)."""
        code, body = await self.api("GET", f"/stations/{station_id}", node=self.alive_nodes()[0])
        if code != 200 or body.get("node") is None:
            return None
        return next((n for n in self.nodes if n.name == body["node"]), None)

    def alive_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]


def pids(cluster: Cluster) -> list[int]:
    """The process ids of every node and HAProxy still running (for a test checking that none is left)."""
    processes = [cluster.haproxy] + [n.process for n in cluster.nodes]
    return [p.transport.pid for p in processes if p is not None and p.status is None and p.transport.pid]


__all__ = ["Cluster", "Node", "TOKEN", "TEMPLATE", "cluster_settings", "haproxy_config",
           "haproxy_binary", "pids"]
