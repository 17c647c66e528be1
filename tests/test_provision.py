"""Provisioning (CA, certificates, keys, kits) and the audit-log functions."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pneumofed.common.cli import main as cli_main
from pneumofed.common.federation import audit
from pneumofed.deploy.provision import FederationSpec, load_federation, provision

FEDERATION_TOML = """
name = "cwp-study"

[superlink]
hosts = ["link.example.org", "10.1.2.3"]
fleet-port = 9092
control-port = 9093

[[hospitals]]
name = "hospital-1"
data-path = "/srv/pneumofed/roistore"

[[hospitals]]
name = "hospital-2"
data-path = "/data/cxr/rois"
audit-log = "/var/log/pneumofed/audit.jsonl"
"""


@pytest.fixture
def federation_file(tmp_path: Path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(FEDERATION_TOML)
    return path


@pytest.fixture
def provisioned(federation_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    provision(load_federation(federation_file), out)
    return out


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _is_private_key(path: Path) -> bool:
    head = path.read_bytes()[:64]
    return b"PRIVATE KEY" in head


def test_superlink_certificate_is_issued_by_the_ca_for_every_host_and_loopback(provisioned: Path) -> None:
    ca = _certificate(provisioned / "coordinator" / "ca.crt")
    server = _certificate(provisioned / "coordinator" / "superlink.crt")
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    }
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key((provisioned / "coordinator" / "superlink.key").read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_hospital_keys_are_openssh_p384_and_the_coordinator_holds_only_their_public_halves(provisioned: Path) -> None:
    for name in ("hospital-1", "hospital-2"):
        kit = provisioned / "hospitals" / name
        private = serialization.load_ssh_private_key((kit / "node.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        registered = serialization.load_ssh_public_key((provisioned / "coordinator" / "hospital-keys" / f"{name}.pub").read_bytes())
        assert registered == private.public_key()
    hospital_1 = serialization.load_ssh_private_key((provisioned / "hospitals/hospital-1/node.key").read_bytes(), None)
    hospital_2 = serialization.load_ssh_private_key((provisioned / "hospitals/hospital-2/node.key").read_bytes(), None)
    assert hospital_1.public_key() != hospital_2.public_key()


def test_no_private_key_leaves_its_owner_and_key_files_are_private(provisioned: Path) -> None:
    expected_private = {
        provisioned / "ca" / "ca.key",
        provisioned / "coordinator" / "superlink.key",
        provisioned / "hospitals" / "hospital-1" / "node.key",
        provisioned / "hospitals" / "hospital-2" / "node.key",
    }
    found_private = {path for path in provisioned.rglob("*") if path.is_file() and _is_private_key(path)}
    assert found_private == expected_private
    for path in expected_private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700, path.parent


def test_hospital_kit_holds_ca_node_config_and_start_script(provisioned: Path) -> None:
    kit = provisioned / "hospitals" / "hospital-2"
    assert (kit / "ca.crt").read_bytes() == (provisioned / "ca" / "ca.crt").read_bytes()
    node_config = tomllib.loads((kit / "node-config.toml").read_text())
    assert node_config == {
        "data-path": "/data/cxr/rois", "site-name": "hospital-2", "audit-log": "/var/log/pneumofed/audit.jsonl"
    }
    default_audit = tomllib.loads((provisioned / "hospitals/hospital-1/node-config.toml").read_text())["audit-log"]
    assert default_audit == "/srv/pneumofed/roistore-audit.jsonl"
    script = (kit / "start-supernode.sh").read_text()
    assert "--superlink link.example.org:9092" in script
    assert '--auth-supernode-private-key "$KIT/node.key"' in script
    assert '--root-certificates "$KIT/ca.crt"' in script
    assert stat.S_IMODE((kit / "start-supernode.sh").stat().st_mode) == 0o755


def test_coordinator_kit_connection_proxy_and_superlink_command(provisioned: Path) -> None:
    kit = provisioned / "coordinator"
    connection = tomllib.loads((kit / "flwr-home" / "config.toml").read_text())["superlink"]
    assert connection["default"] == "cwp-study"
    assert connection["cwp-study"] == {"address": "127.0.0.1:9093", "root-certificates": str(kit / "ca.crt")}
    superlink = (kit / "start-superlink.sh").read_text()
    for flag in ("--host 127.0.0.1", "--port 9093", "--enable-supernode-auth", "--database :flwr-in-memory:",
                 "--disable-runtime-dependency-installation", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
        assert flag in superlink
    nginx = (kit / "nginx.conf").read_text()
    assert "listen 0.0.0.0:9092 ssl;" in nginx
    assert "server 127.0.0.1:9093;" in nginx
    assert [line.strip() for line in nginx.splitlines() if line.strip().startswith("location")] == [
        "location /v1/fleet/ {", "location / {"
    ]


def test_rerun_keeps_keys_and_certificate_and_rotate_replaces_only_the_named_key(federation_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = provision(load_federation(federation_file), out)
    assert sorted(first.created_keys) == ["ca", "hospital-1", "hospital-2", "superlink"]
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    second = provision(load_federation(federation_file), out)
    assert second.created_keys == []
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot

    third = provision(load_federation(federation_file), out, rotate=frozenset({"hospital-1"}))
    assert third.created_keys == ["hospital-1"]
    changed = {p for p in snapshot if p.read_bytes() != snapshot[p]}
    assert changed == {
        out / "hospitals/hospital-1/node.key", out / "hospitals/hospital-1/node.pub",
        out / "coordinator/hospital-keys/hospital-1.pub",
    }


def test_new_host_reissues_the_certificate_with_the_same_key(federation_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(load_federation(federation_file), out)
    before = _certificate(out / "coordinator" / "superlink.crt")
    federation_file.write_text(FEDERATION_TOML.replace('"10.1.2.3"', '"10.1.2.3", "link2.example.org"'))
    report = provision(load_federation(federation_file), out)
    after = _certificate(out / "coordinator" / "superlink.crt")
    assert "superlink" in report.kept_keys
    assert after.public_key() == before.public_key() and after.serial_number != before.serial_number
    assert "link2.example.org" in after.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_certificate_close_to_expiry_is_renewed_on_rerun(federation_file: Path, tmp_path: Path) -> None:
    federation_file.write_text("certificate-validity-days = 10\n" + FEDERATION_TOML)
    out = tmp_path / "out"
    provision(load_federation(federation_file), out)
    before = _certificate(out / "coordinator" / "superlink.crt")
    provision(load_federation(federation_file), out)
    after = _certificate(out / "coordinator" / "superlink.crt")
    assert after.serial_number != before.serial_number and after.public_key() == before.public_key()


def test_removed_hospital_is_dropped_from_the_coordinator_but_its_kit_is_kept(federation_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(load_federation(federation_file), out)
    one_hospital = FEDERATION_TOML.split("[[hospitals]]\nname = \"hospital-2\"")[0]
    federation_file.write_text(one_hospital)
    report = provision(load_federation(federation_file), out)
    assert sorted(p.name for p in (out / "coordinator/hospital-keys").iterdir()) == ["hospital-1.pub"]
    assert report.stale_hospital_kits == ["hospital-2"]
    assert (out / "hospitals/hospital-2/node.key").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('data-path = "/data/cxr/rois"', 'data-path = "rois"'), "absolute path"),
        (lambda t: t.replace('"hospital-2"', '"hospital-1"'), "repeated: hospital-1"),
        (lambda t: t.replace('"hospital-2"', '"Hospital 2"'), "should match pattern"),
        (lambda t: t.replace('"10.1.2.3"', '"bad host!"'), "neither an IP address nor a DNS name"),
        (lambda t: t.replace("control-port = 9093", "control-port = 9092"), "must differ"),
        (lambda t: t.replace("fleet-port = 9092", "fleet-port = 9092\nfleet-prot = 1"), "Extra inputs"),
        (lambda t: t.replace("[superlink]", "[superlink"), "not valid TOML"),
    ],
)
def test_invalid_federation_file_is_rejected_with_the_reason(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "federation.toml"
    path.write_text(edit(FEDERATION_TOML))
    with pytest.raises(ValueError, match=message):
        load_federation(path)


def test_unknown_rotate_name_is_rejected(federation_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hospital-9"):
        provision(load_federation(federation_file), tmp_path / "out", rotate=frozenset({"hospital-9"}))


def test_cli_provisions_and_reports_bad_input(federation_file: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["provision", str(federation_file), "--out", str(tmp_path / "out")]) == 0
    assert "keys created: ca, superlink, hospital-1, hospital-2" in capsys.readouterr().out
    assert cli_main(["provision", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_federation_spec_addresses() -> None:
    spec = FederationSpec.model_validate(tomllib.loads(FEDERATION_TOML.replace('"link.example.org", ', '"fd00::5", ')))
    assert spec.superlink.fleet_address == "[fd00::5]:9092"


def test_rerun_puts_back_the_modes_of_kept_private_keys_and_their_folders(federation_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(load_federation(federation_file), out)
    keys = [out / "ca/ca.key", out / "coordinator/superlink.key", *sorted(out.glob("hospitals/*/node.key"))]
    contents = {key: key.read_bytes() for key in keys}
    for key in keys:  # someone loosened them between two runs
        key.chmod(0o644)
        key.parent.chmod(0o755)
    report = provision(load_federation(federation_file), out)
    assert report.created_keys == [] and sorted(report.kept_keys) == ["ca", "hospital-1", "hospital-2", "superlink"]
    for key in keys:
        assert key.read_bytes() == contents[key], key
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700, key.parent


def test_a_kept_key_that_became_a_symlink_is_refused_and_its_target_left_alone(federation_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    provision(load_federation(federation_file), out)
    key = out / "hospitals/hospital-1/node.key"
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_bytes(key.read_bytes())
    elsewhere.chmod(0o644)
    key.unlink()
    key.symlink_to(elsewhere)
    with pytest.raises(ValueError, match="node.key"):
        provision(load_federation(federation_file), out)
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o644


# --- start scripts: environment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "program"),
    [
        ("coordinator/start-superlink.sh", "flower-superlink"),
        ("hospitals/hospital-1/start-supernode.sh", "flower-supernode"),
        ("coordinator/start-proxy.sh", "nginx"),
    ],
)
def test_start_scripts_pass_no_flwr_internal_variable_on(provisioned: Path, tmp_path: Path, script: str, program: str) -> None:
    # FLWR_INTERNAL_GRPC_CONTROL_API=1 would make flower-superlink start an unauthenticated gRPC
    # Control API on all interfaces; the scripts must not hand such switches on from their caller.
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    fake = fake_bin / program  # prints what the real program would have been given
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'env': dict(os.environ), 'argv': sys.argv[1:]}))\n")
    fake.chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if key not in ("NGINX", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL") and not key.startswith("FLWR_INTERNAL_")}
    env.update({
        "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_INTERNAL_GRPC_CONTROL_API": "1",
        "FLWR_INTERNAL_GRPC_FLEET_API": "1",
        "FLWR_INTERNAL_SOMETHING_NEW": "on",
        "PNEUMOFED_NOTE": "kept\nFLWR_INTERNAL_GHOST=1",  # a value that looks like another variable
        "FORWARDED_ALLOW_IPS": "*",
    })
    result = subprocess.run([str(provisioned / script), "--extra-flag"], check=False, env=env, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert sorted(name for name in seen["env"] if name.startswith("FLWR_INTERNAL_")) == []
    assert seen["env"]["PNEUMOFED_NOTE"] == "kept\nFLWR_INTERNAL_GHOST=1"
    if program != "nginx":  # extra flags reach the Flower program (start-proxy.sh takes none)
        assert seen["argv"][-1] == "--extra-flag"
    if program == "flower-superlink":  # uvicorn trusts X-Forwarded-For only from nginx on loopback
        assert seen["env"]["FORWARDED_ALLOW_IPS"] == "127.0.0.1"
    if program == "flower-supernode":  # its Runtime API stays on loopback, its SuperExec looks there often
        assert seen["argv"][seen["argv"].index("--host") + 1] == "127.0.0.1"
        assert seen["env"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"


# --- hospital-facing nginx, in front of a stand-in SuperLink -------------------------------------------------------

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx-light): it is the hospital-facing proxy"
)


def _fleet_paths() -> list[str]:
    """Every route of Flower's Fleet HTTP API: the paths the proxy must forward, no more."""
    from flwr.superlink.routers.fleet.router import router

    assert {method for route in router.routes for method in route.methods} == {"POST"}
    return sorted(route.path for route in router.routes)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Echo(BaseHTTPRequestHandler):
    """Stand-in SuperLink: records and echoes the request target and headers nginx sent."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        seen = {"method": self.command, "path": self.path,
                "headers": {name.lower(): self.headers.get_all(name) for name in self.headers}}
        self.server.seen.append(seen)  # type: ignore[attr-defined]
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


class _Proxy:
    def __init__(self, port: int, ca: Path, seen: list[dict]) -> None:
        self.port, self.ca, self.seen = port, ca, seen

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def request(self, target: str, method: str = "POST", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Send `target` byte for byte as the request line's target (no client-side normalisation)."""
        connection = http.client.HTTPSConnection("localhost", self.port, context=self.context(), timeout=20)
        try:
            connection.request(method, target, body=b"", headers={"content-type": "application/protobuf", **(headers or {})})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def client(self, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
        """A client context that offers only `version` and, for TLS 1.2, only `ciphers`."""
        context = self.context()
        context.minimum_version = context.maximum_version = version
        if ciphers:
            context.set_ciphers(ciphers)  # raises here, not in the handshake, if this OpenSSL lacks a suite
            assert [c["name"] for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"] == ciphers.split(":")
        return context

    def handshake(self, context: ssl.SSLContext) -> str:
        """The suite negotiated with nginx."""
        with (socket.create_connection(("127.0.0.1", self.port), timeout=20) as raw,
              context.wrap_socket(raw, server_hostname="localhost") as tls):
            return tls.cipher()[0]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Proxy]:
    """The kit's nginx (started by start-proxy.sh) in front of an echoing HTTPS stand-in for the SuperLink."""
    root = tmp_path_factory.mktemp("proxy")
    fleet_port, control_port = _free_port(), _free_port()
    (root / "federation.toml").write_text(
        'name = "proxy-study"\n[[hospitals]]\nname = "hospital-1"\ndata-path = "/srv/rois"\n'
        f'[superlink]\nhosts = ["localhost"]\nfleet-port = {fleet_port}\ncontrol-port = {control_port}\n'
        'proxy-bind = "127.0.0.1"\n'
    )
    kit = provision(load_federation(root / "federation.toml"), root / "kits").coordinator_kit

    upstream = ThreadingHTTPServer(("127.0.0.1", control_port), _Echo)
    upstream.seen = []  # type: ignore[attr-defined]
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(kit / "superlink.crt", kit / "superlink.key")
    upstream.socket = tls.wrap_socket(upstream.socket, server_side=True)
    serving = threading.Thread(target=upstream.serve_forever, daemon=True)
    serving.start()

    log = (root / "nginx.log").open("wb")
    nginx = subprocess.Popen([str(kit / "start-proxy.sh")], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, "NGINX": str(NGINX)})
    try:
        deadline = time.monotonic() + 30
        while True:
            assert nginx.poll() is None, (kit / "proxy" / "error.log").read_text(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", fleet_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.2)
        yield _Proxy(fleet_port, kit / "ca.crt", upstream.seen)  # type: ignore[attr-defined]
    finally:
        if nginx.poll() is None:
            nginx.send_signal(signal.SIGTERM)
            try:
                nginx.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(nginx.pid, signal.SIGKILL)  # the worker of this nginx only
        except ProcessLookupError:
            pass
        nginx.wait(10)
        log.close()
        upstream.shutdown()
        upstream.server_close()


@pytest.fixture
def nginx_proxy(proxy: _Proxy) -> _Proxy:
    proxy.seen.clear()
    return proxy


@needs_nginx
def test_proxy_forwards_each_fleet_api_path_as_that_exact_path(nginx_proxy: _Proxy) -> None:
    paths = _fleet_paths()
    assert len(paths) == 12 and all(path.startswith("/v1/fleet/") for path in paths)
    for path in paths:
        status, body = nginx_proxy.request(path)
        assert status == 200, path
        assert json.loads(body)["path"] == path
    assert [(seen["method"], seen["path"]) for seen in nginx_proxy.seen] == [("POST", path) for path in paths]


@needs_nginx
@pytest.mark.parametrize(
    "target",
    [
        # dot segments that normalise to a Fleet path (nginx used to forward the raw URI)
        "/v1/control/../fleet/get-run", "/v1/runtime/../fleet/pull-messages", "/v1/fleet/../fleet/get-run",
        "/v1/fleet/./get-run", "/v1/fleet/get-run/.", "/v1/fleet/x/../get-run",
        # encoded dots and slashes, other encodings of an allowed path
        "/v1/fleet/%2e%2e/control/list-nodes", "/v1/fleet/..%2fcontrol/list-nodes", "/v1/fleet%2fget-run",
        "/v1/fleet/get-run%2f", "/v1/fleet/get%2Drun", "/v1/fleet/%67et-run", "/v1%2ffleet%2fget-run",
        "/v1/control/%2e%2e/fleet/get-run",
        # near misses of an allowed path
        "//v1/fleet/get-run", "/v1//fleet/get-run", "/v1/fleet//get-run", "/v1/fleet/get-run/",
        "/v1/fleet/get-run?node=1", "/v1/fleet/get-run?", "/v1/fleet/get-run;x", "/v1/fleet/GET-RUN",
        "/V1/FLEET/GET-RUN", "/v1/fleet/get-run-extra", "/v1/fleet/", "/v1/fleet/unknown",
        # everything that is not the Fleet API
        "/v1/control/list-nodes", "/v1/control/register-node", "/v1/runtime/pull-task-input",
        "/v1/fleet/../control/list-nodes", "/health", "/docs", "/openapi.json", "/",
    ],
)
def test_proxy_refuses_any_raw_target_that_is_not_an_allow_listed_fleet_path(nginx_proxy: _Proxy, target: str) -> None:
    status, _ = nginx_proxy.request(target)
    assert status == 403, target
    assert nginx_proxy.seen == []


@needs_nginx
def test_proxy_refuses_fleet_paths_with_other_methods(nginx_proxy: _Proxy) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, _ = nginx_proxy.request("/v1/fleet/get-run", method=method)
        assert status == 403, method
    assert nginx_proxy.seen == []


@needs_nginx
def test_proxy_sets_forwarding_headers_itself_and_keeps_flower_auth_headers(nginx_proxy: _Proxy) -> None:
    spoofed = {
        "X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.8", "Forwarded": "for=203.0.113.9;proto=http",
        "X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example", "X-Forwarded-Port": "1",
        "X-Forwarded-Prefix": "/v1/control",
        "flwr-public-key": "cHVibGlj", "flwr-signature": "c2lnbmF0dXJl", "flwr-timestamp": "2026-01-01T00:00:00",
    }
    status, body = nginx_proxy.request("/v1/fleet/pull-messages", headers=spoofed)
    assert status == 200
    headers = json.loads(body)["headers"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]  # the connecting address, as nginx saw it
    assert headers["x-real-ip"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    for dropped in ("forwarded", "x-forwarded-host", "x-forwarded-port", "x-forwarded-prefix"):
        assert dropped not in headers, dropped
    assert "203.0.113" not in json.dumps(headers)
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp"):  # SuperNode request signing
        assert headers[name] == [spoofed[name]], name


@needs_nginx
@pytest.mark.parametrize(
    "suite",
    ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"],
)
def test_proxy_accepts_forward_secret_aead_suites_on_tls12(proxy: _Proxy, suite: str) -> None:
    assert proxy.handshake(proxy.client(ssl.TLSVersion.TLSv1_2, suite)) == suite


@needs_nginx
def test_proxy_speaks_tls13(proxy: _Proxy) -> None:
    assert proxy.handshake(proxy.client(ssl.TLSVersion.TLSv1_3)).startswith("TLS_")


@needs_nginx
@pytest.mark.parametrize(
    "suite",
    [
        "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384",
        "ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES256-CCM8", "ECDHE-ECDSA-AES128-CCM", "ECDHE-ECDSA-AES256-CCM",
        "ECDHE-ECDSA-ARIA128-GCM-SHA256", "ECDHE-ECDSA-ARIA256-GCM-SHA384",
        "ECDHE-ECDSA-CAMELLIA128-SHA256", "ECDHE-ECDSA-CAMELLIA256-SHA384",
    ],
)
def test_proxy_refuses_cbc_ccm_aria_and_camellia_suites(proxy: _Proxy, suite: str) -> None:
    client = proxy.client(ssl.TLSVersion.TLSv1_2, suite)
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        proxy.handshake(client)


# --- audit log -------------------------------------------------------------------------------------------------


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "fc.bias": rng.normal(size=3).astype(np.float32)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def test_array_digest_is_identical_for_numpy_and_arrayrecord_and_sensitive_to_any_change() -> None:
    arrays = _arrays(0)
    digest = audit.array_digest(arrays)
    assert audit.array_digest(_record(arrays)) == digest
    assert audit.array_digest(dict(reversed(list(arrays.items())))) == digest
    changed = {k: v.copy() for k, v in arrays.items()}
    changed["fc.bias"][0] += 1e-6
    assert audit.array_digest(changed) != digest
    assert audit.array_digest({"fc.bias2": arrays["fc.bias"], "conv.weight": arrays["conv.weight"]}) != digest
    assert audit.array_digest({**arrays, "fc.bias": arrays["fc.bias"].astype(np.float64)}) != digest


def test_reply_audit_records_join_once_then_each_reply_without_metric_values(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "site.jsonl"
    arrays = _arrays(1)
    train_reply = RecordDict({"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": 20, "train-loss": 0.75})})
    eval_reply = RecordDict({"metrics": MetricRecord({"eval-accuracy": 0.5}), "site": ConfigRecord({"name": "h1"})})
    audit.append_reply_audit(log, run_id=7, server_round=1, kind="train", content=train_reply, node_id=42)
    audit.append_reply_audit(log, run_id=7, server_round=1, kind="evaluate", content=eval_reply, node_id=42)
    audit.append_reply_audit(log, run_id=8, server_round=1, kind="train", content=train_reply, node_id=42)
    entries = audit.read_audit(log)
    assert [(e["event"], e["run_id"]) for e in entries] == [
        ("run-joined", 7), ("reply", 7), ("reply", 7), ("run-joined", 8), ("reply", 8)
    ]
    train = entries[1]
    assert train["round"] == 1 and train["kind"] == "train" and train["node_id"] == 42
    assert train["arrays"] == {"arrays": {"sha256": audit.array_digest(arrays), "bytes": 4 * (36 + 3), "count": 2}}
    assert train["metric_keys"] == {"metrics": ["num-examples", "train-loss"]}
    assert "0.75" not in log.read_text()
    assert entries[2]["arrays"] == {} and entries[2]["config_keys"] == {"site": ["name"]}


def test_run_audit_records_participants_and_global_model_digest(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    audit.append_run_audit(log, run_id=3, event="run-started", details={"rounds": 2})
    audit.append_run_audit(log, run_id=3, event="round", server_round=1, participants=[12, 5], arrays=_arrays(2))
    started, round_one = audit.read_audit(log)
    assert started["details"] == {"rounds": 2} and "participants" not in started
    assert round_one["participants"] == ["12", "5"]
    assert round_one["global_model_sha256"] == audit.array_digest(_arrays(2))
