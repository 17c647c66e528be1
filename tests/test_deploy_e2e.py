"""Deployment on loopback: provisioned kits, nginx in front of a TLS + node-auth SuperLink, real SuperNodes.

Every process is started from the shipped kit scripts in its own session and stopped by pid
(its process group, so the SuperExec/ClientApp children go too) in the fixtures' teardown.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from pneumofed.common.federation import audit
from pneumofed.deploy import pki
from pneumofed.deploy.loopback import LoopbackFederation, free_port, trusting, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("nginx") is None,
        reason="nginx is not installed (apt-get install nginx-light): it is the hospital-facing proxy under test",
    ),
]

FEDERATION = "loopback-study"
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
ROI_SIZE = 32
RUN_CONFIG = (
    f"num-server-rounds=2 local-epochs=1 model-width=0.5 batch-size=8 roi-size={ROI_SIZE} augment=false min-nodes=3"
)
RUN_TIMEOUT_S = 900  # generous for shared CI runners; a dedicated 2-core machine needs about 3 minutes


def _raw_status(port: int, ca: Path, target: str, headers: dict[str, str]) -> int:
    """POST with `target` sent byte for byte as the request target (httpx would resolve dot segments)."""
    connection = http.client.HTTPSConnection("localhost", port, context=trusting(ca), timeout=10)
    try:
        connection.request("POST", target, body=b"", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackFederation]:
    from pneumofed.common.data.prepare import prepare_site
    from pneumofed.common.data.synth import write_hospitals

    root = tmp_path_factory.mktemp("deploy")
    raw = write_hospitals(root / "raw", n_hospitals=len(HOSPITALS), rois_per_hospital=60, seed=0)
    for name, hospital in zip(HOSPITALS, raw):
        prepare_site(hospital / "dicom", hospital / "annotations.csv", root / name / "roistore",
                     roi_size=ROI_SIZE, secret_path=root / name / "site-secret", workers=1)
    with LoopbackFederation(root, {name: root / name / "roistore" for name in HOSPITALS}, FEDERATION) as fed:
        yield fed


def _node_refused(fed: LoopbackFederation, name: str, kit: Path, *extra: str) -> str:
    """Start a SuperNode that must give up on its own; return its log."""
    node = fed.start_node(name, kit, "--max-retries", "0", "--max-wait-time", "30", *extra)
    try:
        node.wait(90)
    finally:
        returncode = fed.processes.stop(node)
    assert returncode != 0
    return fed.processes.log(name)


def _copy_kit(fed: LoopbackFederation, name: str) -> Path:
    copy = fed.root / name
    shutil.copytree(fed.hospital_kit("hospital-1"), copy)
    return copy


def test_control_and_runtime_apis_are_refused_on_the_hospital_facing_port(federation: LoopbackFederation) -> None:
    fed = federation
    public, private = f"https://localhost:{fed.fleet_port}", f"https://127.0.0.1:{fed.control_port}"
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    blocked = [
        "/v1/control/list-nodes", "/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-runs",
        "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input", "/v1/runtime/push-task-output",
        "/v1/runtime/create-task",
        "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/list-nodes", "/v1/fleet/..%2fcontrol/list-nodes",
        # normalise to a Fleet path, but only exact Fleet paths are forwarded (the SuperLink said 404 to these)
        "/v1/control/../fleet/get-run", "/v1/runtime/../fleet/pull-messages", "/v1/fleet//get-run",
        "/v1/fleet/get-run?x=1",
    ]
    with httpx.Client(verify=trusting(fed.ca), timeout=10) as client:
        for path in blocked:  # dot segments and encodings kept as sent by an attacker
            assert _raw_status(fed.fleet_port, fed.ca, path, headers) == 403, path
        for path in ("/docs", "/openapi.json", "/health"):
            assert client.get(public + path).status_code == 403, path
        # The same Control API answers on the SuperLink's loopback port, so the 403s above are the proxy's doing.
        assert client.post(private + "/v1/control/list-nodes", headers=headers, content=b"").status_code == 200
        runtime = client.post(private + "/v1/runtime/pull-task-input", headers=headers, content=b"")
        assert runtime.status_code not in (403, 404)  # reached the Runtime API, which wants a task token

    # The Flower CLI pointed at the hospital-facing port cannot register a node either.
    attacker_home = fed.root / "attacker-flwr-home"
    attacker_home.mkdir()
    (attacker_home / "config.toml").write_text(
        f'[superlink]\ndefault = "via-proxy"\n\n[superlink.via-proxy]\naddress = "localhost:{fed.fleet_port}"\n'
        f'root-certificates = "{fed.ca}"\n'
    )
    rogue_key = fed.root / "attacker.pub"
    rogue_key.write_bytes(pki.public_key_openssh(pki.new_node_key(), "attacker"))
    attempt = subprocess.run(["flwr", "supernode", "register", str(rogue_key), "via-proxy"], text=True, check=False,
                             capture_output=True, timeout=120, env={**fed.processes.env, "FLWR_HOME": str(attacker_home)})
    assert attempt.returncode != 0 and "403" in attempt.stdout + attempt.stderr
    assert len(fed.nodes()) == len(HOSPITALS)


def test_the_superlink_sees_the_proxy_peer_address_not_a_client_supplied_one(federation: LoopbackFederation) -> None:
    fed = federation
    request_line = '"POST /v1/fleet/get-run HTTP/1.1"'
    before = fed.processes.log("superlink").count(request_line)
    spoofed = {"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.8", "Forwarded": "for=203.0.113.9",
               "content-type": "application/protobuf", "accept": "application/protobuf"}
    response = httpx.post(f"https://localhost:{fed.fleet_port}/v1/fleet/get-run", headers=spoofed, content=b"",
                          verify=trusting(fed.ca), timeout=10)
    assert response.status_code == 401  # reached the SuperLink, which wants a registered node's signature
    wait_until(lambda: fed.processes.log("superlink").count(request_line) > before, 30, "the SuperLink's access log")
    log = fed.processes.log("superlink")
    assert "203.0.113." not in log
    access = [line for line in log.splitlines() if request_line in line]
    assert "127.0.0.1:0 - " in access[-1], access[-1]  # uvicorn took the address nginx set (port 0: from the header)


def test_plaintext_connections_are_refused(federation: LoopbackFederation) -> None:
    fed = federation
    response = httpx.post(f"http://localhost:{fed.fleet_port}/v1/fleet/activate-node", timeout=10)
    assert response.status_code == 400 and "plain HTTP request was sent to HTTPS port" in response.text
    with pytest.raises(httpx.HTTPError):  # the SuperLink itself speaks TLS only
        httpx.post(f"http://127.0.0.1:{fed.control_port}/v1/control/list-nodes", timeout=10)
    # A SuperNode speaking plain HTTP (Flower refuses to combine --insecure with a node key, so none is given).
    plain = fed.processes.start("plaintext-node", [
        "flower-supernode", "--insecure", "--superlink", f"localhost:{fed.fleet_port}", "--port", str(free_port()),
        "--max-retries", "0", "--max-wait-time", "30",
    ])
    try:
        plain.wait(90)
    finally:
        returncode = fed.processes.stop(plain)
    assert returncode != 0
    assert "400 Bad Request" in fed.processes.log("plaintext-node")
    assert not any(node["status"] == "online" for node in fed.nodes())


def test_unregistered_node_key_is_refused(federation: LoopbackFederation) -> None:
    fed = federation
    kit = _copy_kit(fed, "unregistered-kit")
    (kit / "node.key").write_bytes(pki.private_key_openssh(pki.new_node_key()))
    log = _node_refused(fed, "unregistered-node", kit)
    assert "Failed to activate SuperNode" in log
    # Without a key the SuperNode tries to register itself through the Fleet API: disabled by node auth.
    anonymous = fed.processes.start("anonymous-node", [
        "flower-supernode", "--superlink", f"localhost:{fed.fleet_port}", "--root-certificates", str(fed.ca),
        "--port", str(free_port()), "--max-retries", "0", "--max-wait-time", "30",
    ])
    try:
        anonymous.wait(90)
    finally:
        returncode = fed.processes.stop(anonymous)
    assert returncode != 0
    assert "All SuperNodes must be registered via the CLI" in fed.processes.log("anonymous-node")
    assert len(fed.nodes()) == len(HOSPITALS)


def test_node_with_another_ca_is_refused(federation: LoopbackFederation) -> None:
    fed = federation
    kit = _copy_kit(fed, "wrong-ca-kit")
    other_ca = pki.create_ca(pki.new_tls_key(), "another-federation", days=30)
    (kit / "ca.crt").write_bytes(pki.certificate_pem(other_ca))
    log = _node_refused(fed, "wrong-ca-node", kit)
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert not any(node["status"] == "online" for node in fed.nodes())


def _runtime_api_is_loopback_only_and_unauthenticated(node: subprocess.Popen[bytes], port: int) -> None:
    """What docs/deploy.md warns about: the SuperNode's Runtime API (PNEUMOFED_RUNTIME_PORT) listens on
    127.0.0.1 only, but serves any local caller without a credential."""
    listening = {connection.laddr.ip for connection in psutil.Process(node.pid).net_connections("inet")
                 if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port}
    assert listening == {"127.0.0.1"}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/runtime/acquire-task", content=b"", timeout=10,
                          headers={"content-type": "application/protobuf", "accept": "application/protobuf"})
    assert response.status_code == 200


def test_two_rounds_on_three_hospitals_complete_and_are_audited(federation: LoopbackFederation) -> None:
    fed = federation
    nodes = fed.start_nodes()
    for name in HOSPITALS:  # before any run exists, so no task can be taken away from a node
        _runtime_api_is_loopback_only_and_unauthenticated(nodes[name], fed.runtime_ports[name])

    run_dir = fed.root / "run"
    run_id = fed.submit(f"{RUN_CONFIG} run-dir='{run_dir}'")

    assert fed.wait_for(run_id, nodes, RUN_TIMEOUT_S) == "finished:completed", fed.processes.log("superlink")[-3000:]

    digests_by_round: dict[int, set[str]] = {}
    for name in HOSPITALS:
        entries = [e for e in audit.read_audit(fed.root / name / "roistore-audit.jsonl") if e["run_id"] == int(run_id)]
        assert [e["event"] for e in entries].count("run-joined") == 1 and entries[0]["event"] == "run-joined"
        replies = [e for e in entries if e["event"] == "reply"]
        train = [e for e in replies if e["kind"] == "train"]
        assert [e["round"] for e in train] == [1, 2], name
        # Round 1's model scored in round 2's TRAIN message, round 2's in its own, then the final test.
        assert [e["round"] for e in replies if e["kind"] == "evaluate"] == [1, 2, 2], name
        assert {e["kind"] for e in replies} == {"query", "train", "evaluate"}
        # The one query: the site's declaration of its training data when it joined the run.
        assert [(e["round"], e["metric_keys"]["metrics"]) for e in replies if e["kind"] == "query"] == [
            (0, ["class-counts", "num-examples"])
        ], name
        for entry in train:
            assert entry["arrays"]["arrays"]["bytes"] > 0 and len(entry["arrays"]["arrays"]["sha256"]) == 64
            assert "num-examples" in entry["metric_keys"]["metrics"]
            digests_by_round.setdefault(entry["round"], set()).add(entry["arrays"]["arrays"]["sha256"])
    # Each site trained on its own data, so the three updates of a round differ.
    assert all(len(digests) == len(HOSPITALS) for digests in digests_by_round.values())
    # One message per site carried round 2's training and round 1's evaluation.
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [record["timing"]["evaluate-exchange-seconds"] > 0 for record in history] == [False, True]
    assert all(not record["rejected-evaluations"] for record in history)

    for name, process in nodes.items():  # SIGTERM is enough: no SuperNode needs killing
        assert fed.processes.stop(process) != -signal.SIGKILL, name
