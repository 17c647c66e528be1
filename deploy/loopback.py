"""A whole federation on one machine's loopback, started from the kits `provision` ships.

The coordinator kit's SuperLink behind its nginx proxy (TLS, node authentication), the hospitals
registered with `register-hospitals.sh`, one SuperNode per hospital started with its kit's
`start-supernode.sh`, and runs submitted with the kit's `flwr.sh`: what a deployment across
hospitals runs, on 127.0.0.1. For rehearsing a deployment before hospitals join, for measuring what
deployment adds to a round (`benchmarks/bench_deploy_overhead.py`) and for the deployment tests.

Every process runs in its own session and is stopped by pid with its process group, so the
SuperExec and ClientApp processes it started go too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from pneumofed.deploy.provision import load_federation, provision


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


STATUS_POLL_S = 5.0


def wait_until(condition: Callable[[], bool], timeout: float, what: str, check: Callable[[], None] = lambda: None,
               interval: float = 0.5) -> None:
    """Poll `condition` every `interval` seconds until it holds; `check` raises when waiting longer is pointless."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def responds(url: str, ca: Path, status: int) -> bool:
    try:
        return httpx.get(url, verify=trusting(ca), timeout=5).status_code == status
    except httpx.HTTPError:
        return False


class Processes:
    """Processes started for one federation, each in its own session and log file, stopped by pid."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        home = self.log_dir / f"flwr-home-{name}"  # Flower installs FABs under FLWR_HOME: one per process
        with (self.log_dir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**self.env, "FLWR_HOME": str(home), **env},
            )
        self.running.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the process, wait for it, then make sure nothing of its group survives."""
        if process.poll() is None:
            os.kill(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # children (SuperExec, app processes) of this group only
        except ProcessLookupError:
            pass
        if process in self.running:
            self.running.remove(process)
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)


class LoopbackFederation:
    """Kits for `hospitals` (name -> ROI store) provisioned under `root`, the coordinator's SuperLink
    and proxy started and the hospitals registered; SuperNodes and runs on request."""

    def __init__(self, root: Path, hospitals: Mapping[str, Path], name: str = "loopback") -> None:
        self.root, self.name = root, name
        self.hospitals = dict(hospitals)
        self.fleet_port, self.control_port = free_port(), free_port()
        self.out = root / "kits"
        self.coordinator = self.out / "coordinator"
        self.ca = self.coordinator / "ca.crt"
        self.runtime_ports: dict[str, int] = {}
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        self.processes = Processes(root, env)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.processes.stop_all()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.processes.stop_all()

    def hospital_kit(self, name: str) -> Path:
        return self.out / "hospitals" / name

    def start(self) -> None:
        """Provision the kits, start the SuperLink and the proxy, register the hospitals' keys."""
        listed = "".join(f'[[hospitals]]\nname = "{n}"\ndata-path = "{path}"\n' for n, path in self.hospitals.items())
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "federation.toml").write_text(
            f'name = "{self.name}"\n{listed}\n[superlink]\nhosts = ["localhost"]\n'
            f'fleet-port = {self.fleet_port}\ncontrol-port = {self.control_port}\nproxy-bind = "127.0.0.1"\n'
        )
        provision(load_federation(self.root / "federation.toml"), self.out)
        # Unbuffered, so that its access log (client address per request) can be read while it runs.
        superlink = self.processes.start("superlink", [str(self.coordinator / "start-superlink.sh")], PYTHONUNBUFFERED="1")
        proxy = self.processes.start("proxy", [str(self.coordinator / "start-proxy.sh")])

        def alive() -> None:
            for name, process in (("superlink", superlink), ("proxy", proxy)):
                if process.poll() is not None:
                    raise RuntimeError(f"the {name} exited:\n{self.processes.log(name)[-3000:]}")

        wait_until(lambda: responds(f"https://127.0.0.1:{self.control_port}/health", self.ca, 200), 90, "the SuperLink", alive)
        wait_until(lambda: responds(f"https://localhost:{self.fleet_port}/health", self.ca, 403), 30, "the proxy", alive)
        registration = subprocess.run([str(self.coordinator / "register-hospitals.sh")], env=self.processes.env,
                                      text=True, capture_output=True, timeout=180, check=False)
        if registration.returncode != 0:
            raise RuntimeError(f"register-hospitals.sh failed:\n{registration.stdout}{registration.stderr}")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The coordinator kit's `flwr` (its certificates and SuperLink address)."""
        return subprocess.run([str(self.coordinator / "flwr.sh"), *args], env=self.processes.env, text=True,
                              capture_output=True, timeout=timeout, cwd=self.root, check=False)

    def nodes(self) -> list[dict]:
        result = self.flwr("supernode", "ls", self.name, "--format", "json")
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode ls failed:\n{result.stdout}{result.stderr}")
        return json.loads(result.stdout)["nodes"]

    def start_node(self, name: str, kit: Path, *extra: str) -> subprocess.Popen[bytes]:
        self.runtime_ports[name] = free_port()
        # The hospitals share this machine's cores: each ClientApp's torch would otherwise start a
        # thread per core, and oversubscribed OpenMP threads made training ~7x slower (70-100 s a site, 9-12 s after).
        threads = max(1, len(os.sched_getaffinity(0)) // len(self.hospitals))
        return self.processes.start(name, [str(kit / "start-supernode.sh"), *extra],
                                    PNEUMOFED_RUNTIME_PORT=str(self.runtime_ports[name]), OMP_NUM_THREADS=str(threads))

    def start_nodes(self, timeout: float = 120) -> dict[str, subprocess.Popen[bytes]]:
        """One SuperNode per hospital from its own kit, once all of them are online."""
        nodes = {name: self.start_node(name, self.hospital_kit(name)) for name in self.hospitals}
        wait_until(lambda: sum(n["status"] == "online" for n in self.nodes()) == len(nodes), timeout,
                   f"{len(nodes)} online SuperNodes", lambda: self.check_alive(nodes))
        return nodes

    def check_alive(self, nodes: Mapping[str, subprocess.Popen[bytes]]) -> None:
        for name, process in nodes.items():
            if process.poll() is not None:
                raise RuntimeError(f"SuperNode {name} exited:\n{self.processes.log(name)[-3000:]}")

    def submit(self, run_config: str) -> str:
        """Start a run of the coordinator kit's Flower app with `run_config`; its run id."""
        started = self.flwr("run", str(self.coordinator / "flower-app"), self.name, "--run-config", run_config,
                            "--format", "json", timeout=300)
        if started.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{started.stdout}{started.stderr}")
        return str(json.loads(started.stdout)["run-id"])

    def status(self, run_id: str) -> str:
        listing = self.flwr("ls", self.name, "--run-id", run_id, "--format", "json")
        return json.loads(listing.stdout)["runs"][0]["status"] if listing.returncode == 0 else "unknown"

    def wait_for(self, run_id: str, nodes: Mapping[str, subprocess.Popen[bytes]], timeout: float) -> str:
        """Wait until the run has finished; its final status (e.g. `finished:completed`)."""
        # Each status check is a new `flwr ls` process (about a CPU-second): polled every 0.5 s it
        # took a core from the SuperNodes' training on a 2-core machine.
        wait_until(lambda: self.status(run_id).startswith("finished"), timeout, f"run {run_id}",
                   lambda: self.check_alive(nodes), interval=STATUS_POLL_S)
        return self.status(run_id)
