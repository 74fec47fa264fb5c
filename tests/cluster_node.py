"""One node of the test cluster: its files, its environment and its OS processes."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

NET_TICKTIME_SECONDS = 10  # production's 60 would take a minute to notice a silent peer
MEMORY_HIGH_WATERMARK = "1GiB"  # three nodes share the machine with everything else
DISK_FREE_LIMIT = "200MB"
# The nodes and the CLI tools: distribution on loopback only, never an epmd of their own.
DISTRIBUTION_ERL_ARGS = "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
MARKER = "-pstest_node"  # an Erlang user flag: the node's name in its VM's command line

# Runs in the nodes' process group. When the test process dies without closing the
# cluster, the pipe to this one closes: it kills the nodes and removes their files.
WATCHDOG = """
import os, shutil, signal, sys
sys.stdin.buffer.read()
group = os.getpgid(0)
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
        try:
            if os.getpgid(int(entry)) == group:
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def cli_env(home: Path, epmd_port: int, env_file: Path) -> dict[str, str]:
    """The environment of the CLI tools (and, with more, of the nodes): this cluster's
    cookie, name server and (empty) ``rabbitmq-env.conf``, nothing of the machine's broker."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RABBITMQ_", "ERL_"))
    }
    return {
        **inherited,
        "HOME": str(home),
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_CONF_ENV_FILE": str(env_file),
        # Any free port for a CLI tool's own node (not the machine's 35672-35682).
        "RABBITMQ_CTL_DIST_PORT_MIN": "0",
        "RABBITMQ_CTL_DIST_PORT_MAX": "0",
        "RABBITMQ_CTL_ERL_ARGS": DISTRIBUTION_ERL_ARGS,
    }


def start_watchdog(root: Path) -> subprocess.Popen[bytes]:
    """``WATCHDOG`` as the leader of a new process group, for the nodes to join."""
    return subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, root], stdin=subprocess.PIPE, process_group=0
    )


@dataclass
class Node:
    name: str
    directory: Path
    amqp_port: int  # what the node listens on; clients use its proxy
    distribution_port: int
    management_port: int  # the management API (rabbitmq_management), on loopback
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.directory / "rabbitmq.pid"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self, plugins: tuple[str, ...]) -> None:
        for directory in ("mnesia", "log", "plugins-expand"):
            (self.directory / directory).mkdir(parents=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "cluster_partition_handling = pause_minority\n"
            f"vm_memory_high_watermark.absolute = {MEMORY_HIGH_WATERMARK}\n"
            f"disk_free_limit.absolute = {DISK_FREE_LIMIT}\n"
            "log.console = false\n"
            "log.file.level = info\n"
            + (  # a plugin's settings are refused unless it is enabled
                f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
                if "rabbitmq_management" in plugins
                else ""
            )
        )
        (self.directory / "advanced.config").write_text(
            f"[{{kernel, [{{net_ticktime, {NET_TICKTIME_SECONDS}}}]}}].\n"
        )
        (self.directory / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")

    def launch(self, server: Path, env: dict[str, str], process_group: int) -> None:
        """Run ``server`` (``rabbitmq-server``) for this node, in ``process_group``."""
        directory = self.directory
        with (directory / "log" / "stdout.log").open("ab") as log:
            self.process = subprocess.Popen(
                [server],
                env={
                    **env,
                    "RABBITMQ_NODENAME": self.name,
                    "RABBITMQ_DIST_PORT": str(self.distribution_port),
                    "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
                    "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
                    "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(directory / "log"),
                    "RABBITMQ_PLUGINS_EXPAND_DIR": str(directory / "plugins-expand"),
                    "RABBITMQ_PID_FILE": str(self.pid_file),
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": " ".join(
                        (DISTRIBUTION_ERL_ARGS, MARKER, self.name)
                    ),
                },
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=process_group,
            )

    def vm_pids(self) -> list[int]:
        """The node's Erlang VM: its pid file's pid if its command line names the node,
        else any process whose command line does (one killed before it wrote the file)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _names(pid, self.name):
            return [pid]
        return [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _names(int(entry.name), self.name)
        ]

    def log_tail(self, lines: int = 30) -> str:
        found = sorted((self.directory / "log").glob("*.log"))
        return "\n".join(
            f"--- {path.name}\n"
            + "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
            for path in found
        )


def _names(pid: int, node: str) -> bool:
    """Whether process ``pid`` is the Erlang VM of ``node`` (by its ``MARKER`` flag)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    marker = [MARKER.encode(), node.encode()]
    return any(arguments[i : i + 2] == marker for i in range(len(arguments) - 1))
