"""Provisioning (CA, certificates, keys, kits) and the audit-log functions."""

from __future__ import annotations

import ipaddress
import stat
import tomllib
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
    for flag in ("--host 127.0.0.1", "--port 9093", "--enable-supernode-auth", "--database",
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
