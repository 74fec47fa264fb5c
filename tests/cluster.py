"""A 3-node RabbitMQ cluster owned by the test session, on this machine.

Nothing of the machine's own broker is used or touched: each node has its own node name
(``pstc-<run>-<n>@localhost``), AMQP and distribution ports, data (mnesia), log and
plugins directories, config files and enabled-plugins file, all under one temporary
directory; the Erlang cookie is in a HOME of the run's own, which the nodes and the CLI
tools run with. The nodes start in parallel; then nodes 2 and 3 ``join_cluster`` node 1
(one at a time) and start again. Teardown stops every node gracefully, SIGKILLs one that
has not stopped in time, and removes the directory.

Configuration (``cluster_node``), as an operator would set up three nodes:
``cluster_partition_handling = pause_minority``, ``net_ticktime`` 10 s (a silent peer is
noticed within seconds, not a minute), a 1 GiB memory high watermark per node (three nodes
share the machine with everything else), a low disk free limit, guest on loopback only,
and the plugins (``rabbitmq_consistent_hash_exchange``, and ``rabbitmq_management`` on a
loopback port of each node's own, which the bench's per-node figures read) in each node's
own enabled-plugins file.

Ports. The nodes' own ports come from ``PortReservations``: random, bindable, below the
ephemeral range, never the machine broker's, and locked in a directory every run shares,
so parallel runs never pick the same one. Everything else (the name server, the proxies)
binds port 0 and keeps its socket for the whole run.

Partitions. ``partition(node)`` cuts a node off through proxies the test owns (see
``cluster_network``), not network namespaces. Namespaces would need root, a veth pair and a
bridge per node, an epmd and a forwarder per namespace to reach the nodes from the tests,
and cleanup of kernel objects that outlive a crashed run. The proxies need nothing of the
machine, leave nothing behind, and let the CLI tools reach a cut-off node, so a test can
watch it pause under ``pause_minority``. A cut connection is reset rather than black-holed,
so the nodes notice at once instead of after ``net_ticktime``.

Processes. A node is ``rabbitmq-server`` (the real script, not Debian's wrapper, which
would run it as the machine's ``rabbitmq`` user). ``kill(node)`` finds the node's Erlang VM
by its pid file, checks that the VM's command line carries the node's unique name
(``-pstest_node <name>``; a VM that has not written its pid file yet is found by that name
alone) and sends it SIGKILL; its helper processes exit with it. The nodes run in the
process group of a watchdog that kills them and removes their files if the test process
dies without closing the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from .cluster_network import ClusterNetwork, PortReservations
from .cluster_node import Node, cli_env, start_watchdog
from .helpers import wait_until

SIZE = 3
PLUGINS = ("rabbitmq_consistent_hash_exchange", "rabbitmq_management")
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0
CLI_INTERVAL = 0.5  # between CLI polls: each one boots an Erlang VM


class ClusterError(RuntimeError):
    """A node of the test cluster or a CLI tool failed."""


class RabbitCluster:
    """``async with RabbitCluster() as cluster``: a running cluster of ``size`` nodes."""

    def __init__(self, size: int = SIZE, plugins: Iterable[str] = PLUGINS) -> None:
        server = shutil.which("rabbitmq-server")
        if server is None:
            raise ClusterError("rabbitmq-server is not on PATH")
        self.bin = Path(os.path.realpath(server)).parent
        self.plugins = tuple(plugins)
        self.root = Path(tempfile.mkdtemp(prefix="pstest-cluster-"))
        self.home = self.root / "home"
        self.ports = PortReservations()
        run = secrets.token_hex(4)
        self._nodes = {
            node.name: node
            for node in (
                Node(
                    f"pstc-{run}-{index}@localhost",
                    self.root / f"node{index}",
                    self.ports.reserve(),
                    self.ports.reserve(),
                    self.ports.reserve(),
                )
                for index in range(1, size + 1)
            )
        }
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.network = ClusterNetwork(
            {node.name: (node.amqp_port, node.distribution_port) for node in self._nodes.values()}
        )

    # ------------------------------------------------------------------ what tests see

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    @property
    def urls(self) -> list[str]:
        return [self.url(node) for node in self._nodes]

    def management_url(self, node: str) -> str:
        """The node's management API (which reports on the whole cluster)."""
        return f"http://127.0.0.1:{self._nodes[node].management_port}/"

    def url(self, node: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.network.amqp_port(node)}/"

    async def rabbitmqctl(self, node: str, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        return await self.cli("rabbitmqctl", node, *args, timeout=timeout)

    async def cli(self, tool: str, node: str, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        """Run a RabbitMQ CLI tool (``rabbitmqctl``, ``rabbitmq-queues``, …) against a node."""
        process = await asyncio.create_subprocess_exec(
            self.bin / tool,
            "-q",
            "-n",
            node,
            *args,
            env=self._cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ClusterError(
                f"{tool} {' '.join(args)} on {node}: no answer in {timeout}s"
            ) from None
        if process.returncode != 0:
            raise ClusterError(f"{tool} {' '.join(args)} on {node} failed: {(err or out).decode()}")
        return out.decode()

    async def cluster_status(self, node: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(
            await self.rabbitmqctl(node, "cluster_status", "--formatter", "json")
        )
        return status

    async def running_nodes(self, node: str) -> set[str]:
        """The nodes ``node`` sees running; empty when it cannot answer."""
        try:
            return set((await self.cluster_status(node))["running_nodes"])
        except ClusterError:
            return set()

    async def paused(self, node: str) -> bool:
        """Whether ``node`` runs but has paused (``pause_minority`` on the losing side of a
        partition): its VM answers the CLI, its RabbitMQ application does not run."""
        try:
            answer = await self.rabbitmqctl(node, "eval", "rabbit:is_running().")
        except ClusterError:
            return False
        return answer.strip() == "false"

    async def wait_paused(self, node: str, *, timeout: float = BOOT_TIMEOUT) -> None:
        await wait_until(
            lambda: self.paused(node), timeout, f"{node} to pause (pause_minority)", CLI_INTERVAL
        )

    async def wait_running(
        self, nodes: Iterable[str] | None = None, *, timeout: float = BOOT_TIMEOUT
    ) -> None:
        """Until each of ``nodes`` (all by default) sees exactly those nodes running."""
        expected = set(nodes or self._nodes)

        async def agreed() -> bool:
            views = await asyncio.gather(*(self.running_nodes(node) for node in expected))
            return all(view == expected for view in views)

        await wait_until(agreed, timeout, f"{sorted(expected)} running together", CLI_INTERVAL)

    async def queue_info(self, queue: str, *, vhost: str = "/") -> dict[str, Any]:
        """``list_queues`` of one queue: its type, leader, members and online members."""
        listing = await self.rabbitmqctl(
            self._reachable(),
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "leader",
            "members",
            "online",
            "messages",
            "--formatter",
            "json",
        )
        for row in json.loads(listing):
            if row["name"] == queue:
                info: dict[str, Any] = row
                return info
        raise ClusterError(f"no queue {queue!r} in vhost {vhost!r}")

    async def quorum_status(self, queue: str, *, vhost: str = "/") -> list[dict[str, Any]]:
        """``rabbitmq-queues quorum_status``: each member's node and Raft state."""
        status: list[dict[str, Any]] = json.loads(
            await self.cli(
                "rabbitmq-queues",
                self._reachable(),
                "quorum_status",
                "-p",
                vhost,
                queue,
                "--formatter",
                "json",
            )
        )
        return status

    async def leader_of(self, queue: str, *, vhost: str = "/") -> str:
        """The node whose member of the quorum queue ``queue`` is its Raft leader."""
        leader: str = (await self.queue_info(queue, vhost=vhost))["leader"]
        return leader

    async def kill(self, node: str) -> None:
        """SIGKILL the node's Erlang VM (its helper processes exit with it), then the
        ``rabbitmq-server`` script that ran it."""
        member = self._nodes[node]
        for pid in member.vm_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if member.process is not None:
            member.process.kill()
            await asyncio.to_thread(member.process.wait, STOP_TIMEOUT)
        member.process = None
        member.pid_file.unlink(missing_ok=True)

        async def unregistered() -> bool:
            return not self.network.registered(node)

        # Otherwise a restart could take the dead node's registration for its own.
        await wait_until(unregistered, STOP_TIMEOUT, f"{node} to leave the name server")

    async def stop(self, node: str) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``); SIGKILL it if it has not
        stopped within ``STOP_TIMEOUT``."""
        member = self._nodes[node]
        if member.process is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        with contextlib.suppress(ClusterError):
            await self.rabbitmqctl(node, "stop", timeout=STOP_TIMEOUT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(member.process.wait, max(0.1, deadline - time.monotonic()))
        await self.kill(node)  # nothing left to kill, unless it did not stop

    async def start(self, node: str) -> None:
        """Start a stopped or killed node; return once it runs with every live node."""
        member = self._nodes[node]
        if member.running:
            raise ClusterError(f"{node} is already running")
        self._launch(member)
        await self._booted(member)
        await self.wait_running(name for name, other in self._nodes.items() if other.running)

    async def restart(self, node: str) -> None:
        await self.stop(node)
        await self.start(node)

    async def mend(self) -> None:
        """Heal every partition and start every stopped node: the whole cluster again."""
        broken = [
            member
            for node, member in self._nodes.items()
            if self.network.is_cut(node) or not member.running
        ]
        for member in broken:
            await self.heal(member.name)
            if not member.running:
                await self.kill(member.name)  # what may be left of it
                self._launch(member)
        await asyncio.gather(*(self._booted(member) for member in broken))
        await self.wait_running()

    async def partition(self, node: str) -> None:
        """Cut ``node`` off from the other nodes and from AMQP clients (see
        ``ClusterNetwork.partition``); the CLI tools still reach it."""
        await self.network.partition(node)

    async def heal(self, node: str) -> None:
        await self.network.heal(node)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RabbitCluster:
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> None:
        self.home.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").touch()  # instead of the machine's /etc/rabbitmq one
        for member in self._nodes.values():
            member.write_config(self.plugins)
        self._watchdog = start_watchdog(self.root)
        await self.network.start()
        for member in self._nodes.values():
            self._launch(member)
        await asyncio.gather(*(self._booted(member) for member in self._nodes.values()))
        first, *others = self._nodes
        await asyncio.gather(*(self.rabbitmqctl(node, "stop_app") for node in others))
        for node in others:  # one at a time: each join changes the cluster's schema
            await self.rabbitmqctl(node, "join_cluster", first)
        await asyncio.gather(*(self.rabbitmqctl(node, "start_app") for node in others))
        await self.wait_running()

    async def close(self) -> None:
        """Stop every node (bounded in time), the network, and remove every file."""
        await asyncio.gather(*(self.stop(node) for node in self._nodes), return_exceptions=True)
        for node in self._nodes:  # whatever a failed stop left behind
            await self.kill(node)
        await self.network.close()
        if self._watchdog is not None:
            assert self._watchdog.stdin is not None
            self._watchdog.stdin.close()
            await asyncio.to_thread(self._watchdog.wait, STOP_TIMEOUT)
        self.ports.release_all()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ the nodes

    def _cli_env(self) -> dict[str, str]:
        return cli_env(self.home, self.network.epmd_port, self.root / "rabbitmq-env.conf")

    def _launch(self, member: Node) -> None:
        assert self._watchdog is not None
        member.launch(self.bin / "rabbitmq-server", self._cli_env(), self._watchdog.pid)

    async def _booted(self, member: Node) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT

        async def registered_or_gone() -> bool:
            return self.network.registered(member.name) or not member.running

        await wait_until(registered_or_gone, BOOT_TIMEOUT, f"{member.name} to register")
        remaining = max(1, int(deadline - time.monotonic()))
        failure = None if member.running else "it exited"
        if failure is None:
            try:
                await self.rabbitmqctl(
                    member.name, "await_startup", "--timeout", str(remaining), timeout=remaining + 5
                )
            except ClusterError as exc:
                failure = str(exc)
        if failure is not None:
            raise ClusterError(f"{member.name} did not boot: {failure}\n{member.log_tail()}")

    def _reachable(self) -> str:
        """A running node that is not cut off, to ask about the cluster."""
        for name, member in self._nodes.items():
            if member.running and not self.network.is_cut(name):
                return name
        raise ClusterError("no node is running and reachable")


def require_rabbitmq_server() -> None:
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not on PATH: the cluster tests run nodes of their own")


@pytest.fixture(scope="session")
async def rabbit_cluster() -> AsyncIterator[RabbitCluster]:
    """A 3-node cluster for the whole session; tests that break it must mend it."""
    require_rabbitmq_server()
    started = time.monotonic()
    async with RabbitCluster() as cluster:
        print(f"\ncluster {', '.join(cluster.nodes)} up in {time.monotonic() - started:.1f}s")
        yield cluster
