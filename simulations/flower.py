"""Runs the pneumofed Flower app as a local simulation (Flower's Ray backend) and cleans up.

`flwr run` starts a detached local SuperLink that outlives the command. Each simulation
gets its own FLWR_HOME and its own ports, and the SuperLink it started is stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import tomli_w
import torch

from pneumofed.common.federation.flower_app import write_flower_app


class SimulationFailed(RuntimeError):
    pass


def run_simulation(
    sites: Sequence[Path],
    run_config: Mapping[str, Any],
    *,
    cpus_per_client: int = 1,
    stream: bool = True,
    timeout: float | None = None,
) -> None:
    """Run the app on one simulated node per site ROI store; raises SimulationFailed on error."""
    if not sites:
        raise SimulationFailed("a simulation needs at least one site")
    overrides = dict(run_config) | {"sites": ",".join(str(Path(s).resolve()) for s in sites)}
    flwr_home = Path(tempfile.mkdtemp(prefix="pneumofed-flwr-"))
    try:
        gpus_per_client = 1.0 / len(sites) if torch.cuda.is_available() else 0.0
        federation_config = (
            f"num-supernodes={len(sites)} client-resources-num-cpus={cpus_per_client} "
            f"client-resources-num-gpus={gpus_per_client}"
        )
        (flwr_home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": "pneumofed-local", "pneumofed-local": {"address": ":local:"}}})
        )
        (flwr_home / "run-config.toml").write_text(tomli_w.dumps(overrides))
        env = os.environ | {
            # `flwr` launches `flower-superlink` by name: find it beside this interpreter.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        }
        command = [
            "flwr", "run", str(write_flower_app(flwr_home / "app")), "pneumofed-local",
            "--run-config", str(flwr_home / "run-config.toml"),
            "--federation-config", federation_config,
        ] + (["--stream"] if stream else [])
        completed = subprocess.run(command, env=env, timeout=timeout, check=False)
        if completed.returncode != 0:
            raise SimulationFailed(f"`flwr run` exited with {completed.returncode}")
    finally:
        stop_local_superlink(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)


def stop_local_superlink(flwr_home: Path) -> list[int]:
    """Terminate the SuperLink (and its children) that `flwr run` started under `flwr_home`."""
    marker = str(flwr_home / "local-superlink")
    stopped = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(marker in part for part in cmdline) and any("flower-superlink" in part for part in cmdline):
            family = [process, *process.children(recursive=True)]
            for member in family:
                member.terminate()
            _, alive = psutil.wait_procs(family, timeout=10)
            for member in alive:
                member.kill()
            stopped.append(process.pid)
    return stopped


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
