"""`pneumofed provision`: federation CA, SuperLink certificate, SuperNode keys and one kit per party.

Output layout (OUT is `--out`):

    OUT/ca/                    the federation CA key: stays with whoever provisions, in no kit
    OUT/coordinator/           SuperLink host: certificate + key, hospitals' public keys, nginx
                               config, Flower connection (flwr-home/config.toml), the Flower app
                               to run (flower-app/), scripts
    OUT/hospitals/<name>/      one per hospital: CA certificate, its own SuperNode key,
                               node-config.toml, start script

Every private key is written once, mode 0600, in exactly one place; re-running keeps existing
keys (and certificates still valid for the current federation file) unless `--rotate` names them,
and puts the modes back on every run: 0600 for each private key, kept or new, and 0700 for the
folders that hold one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pneumofed.common.federation.flower_app import write_flower_app
from pneumofed.common.files import atomic_write
from pneumofed.deploy import pki

SLUG = r"^[a-z0-9][a-z0-9-]{0,62}$"
HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
CA_NAME = "ca"
SUPERLINK_NAME = "superlink"
RENEW_BEFORE = dt.timedelta(days=30)


class SuperLinkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    hosts: list[str] = Field(min_length=1, description="names/IPs hospitals use to reach the proxy; first = default")
    fleet_port: int = Field(9092, ge=1, le=65535, alias="fleet-port", description="hospital-facing proxy port")
    control_port: int = Field(9093, ge=1, le=65535, alias="control-port", description="SuperLink port on loopback")
    proxy_bind: str = Field("0.0.0.0", alias="proxy-bind", description="address the proxy listens on")

    @field_validator("hosts")
    @classmethod
    def _valid_hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not (_is_ip(host) or HOSTNAME.match(host)):
                raise ValueError(f"{host!r} is neither an IP address nor a DNS name")
        return hosts

    @field_validator("proxy_bind")
    @classmethod
    def _valid_bind(cls, address: str) -> str:
        if not _is_ip(address):
            raise ValueError(f"proxy-bind must be an IP address, got {address!r}")
        return address

    @model_validator(mode="after")
    def _distinct_ports(self) -> SuperLinkSpec:
        if self.fleet_port == self.control_port:
            raise ValueError("fleet-port and control-port must differ")
        return self

    @property
    def fleet_address(self) -> str:
        return _host_port(self.hosts[0], self.fleet_port)


class HospitalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str = Field(pattern=SLUG, description="site name, also the SuperNode's name at the SuperLink")
    data_path: Path = Field(alias="data-path", description="absolute path of the ROI store on the hospital machine")
    audit_log: Path | None = Field(None, alias="audit-log", description="absolute path; default next to data-path")

    @field_validator("data_path", "audit_log")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # The ClientApp runs in a fresh process per message, with no fixed working directory.
        if path is not None and not path.is_absolute():
            raise ValueError(f"must be an absolute path on the hospital machine, got {str(path)!r}")
        return path

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.data_path.with_name(f"{self.data_path.name}-audit.jsonl")


class FederationSpec(BaseModel):
    """The federation file: who takes part and where the SuperLink is reached."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str = Field(pattern=SLUG)
    superlink: SuperLinkSpec
    hospitals: list[HospitalSpec] = Field(min_length=1)
    ca_validity_days: int = Field(3650, ge=1, alias="ca-validity-days")
    certificate_validity_days: int = Field(825, ge=1, alias="certificate-validity-days")

    @model_validator(mode="after")
    def _unique_hospitals(self) -> FederationSpec:
        names = [hospital.name for hospital in self.hospitals]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"hospital names must be unique; repeated: {', '.join(duplicates)}")
        if {CA_NAME, SUPERLINK_NAME, "all"} & set(names):
            raise ValueError(f"hospital names {CA_NAME!r}, {SUPERLINK_NAME!r} and 'all' are reserved")
        return self


def load_federation(path: Path) -> FederationSpec:
    """Read and validate a TOML federation file; errors name the file and the offending field."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err
    try:
        return FederationSpec.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid federation file:\n{err}") from err


class ProvisionReport(BaseModel):
    coordinator_kit: Path
    hospital_kits: dict[str, Path]
    created_keys: list[str]
    kept_keys: list[str]
    stale_hospital_kits: list[str]


def provision(spec: FederationSpec, out_dir: Path, *, rotate: frozenset[str] = frozenset()) -> ProvisionReport:
    """Create or refresh the CA, keys and kits under `out_dir` for `spec`.

    `rotate` names keys to replace: "ca", "superlink", hospital names, or "all".
    """
    known = {CA_NAME, SUPERLINK_NAME, "all", *(h.name for h in spec.hospitals)}
    if unknown := sorted(set(rotate) - known):
        raise ValueError(f"cannot rotate unknown key(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    rotate_all = "all" in rotate
    out_dir = Path(out_dir).resolve()
    created: list[str] = []
    kept: list[str] = []

    def key(path: Path, name: str, new_key: Callable[[], pki.PrivateKey],
            encode: Callable[[pki.PrivateKey], bytes]) -> pki.PrivateKey:
        if path.exists() and not (rotate_all or name in rotate):
            kept.append(name)
            return pki.load_private_key(_read_secret(path))
        created.append(name)
        fresh = new_key()
        _write_secret(path, encode(fresh))
        return fresh

    ca_dir = _private_dir(out_dir / "ca")
    ca_key = key(ca_dir / "ca.key", CA_NAME, pki.new_tls_key, pki.private_key_pem)
    ca_certificate = _current_ca(ca_dir / "ca.crt", ca_key, spec)

    coordinator = _private_dir(out_dir / "coordinator")
    superlink_key = key(coordinator / "superlink.key", SUPERLINK_NAME, pki.new_tls_key, pki.private_key_pem)
    superlink_certificate = _current_server_certificate(
        coordinator / "superlink.crt", ca_key, ca_certificate, superlink_key, spec
    )

    hospital_kits: dict[str, Path] = {}
    public_keys: dict[str, bytes] = {}
    for hospital in spec.hospitals:
        kit = _private_dir(out_dir / "hospitals" / hospital.name)
        node_key = key(kit / "node.key", hospital.name, pki.new_node_key, pki.private_key_openssh)
        public_keys[hospital.name] = pki.public_key_openssh(node_key, f"{spec.name}/{hospital.name}")
        _write_public(kit / "node.pub", public_keys[hospital.name])
        _write_public(kit / "ca.crt", pki.certificate_pem(ca_certificate))
        _write_public(kit / "node-config.toml", _node_config(hospital))
        values = {"federation": spec.name, "site_name": hospital.name, "kit": str(kit),
                  "superlink_address": spec.superlink.fleet_address}
        _write_script(kit / "start-supernode.sh", _render("start-supernode.sh", values))
        _write_public(kit / "systemd" / "pneumofed-supernode.service", _render("pneumofed-supernode.service", values))
        hospital_kits[hospital.name] = kit

    _write_public(coordinator / "ca.crt", pki.certificate_pem(ca_certificate))
    _write_public(coordinator / "superlink.crt", pki.certificate_pem(superlink_certificate))
    keys_dir = coordinator / "hospital-keys"
    keys_dir.mkdir(exist_ok=True)
    for stale in keys_dir.glob("*.pub"):
        if stale.stem not in public_keys:
            stale.unlink()  # a hospital removed from the federation file is no longer registered
    for name, public_key in public_keys.items():
        _write_public(keys_dir / f"{name}.pub", public_key)
    _write_public(coordinator / "flwr-home" / "config.toml", flower_connection(spec, coordinator / "ca.crt"))
    values = {"federation": spec.name, "kit": str(coordinator), "control_port": str(spec.superlink.control_port),
              "listen": _host_port(spec.superlink.proxy_bind, spec.superlink.fleet_port)}
    _write_public(coordinator / "nginx.conf", _render("nginx.conf", values))
    write_flower_app(coordinator / "flower-app")  # what `flwr.sh run flower-app <federation>` ships
    for script in ("start-superlink.sh", "start-proxy.sh", "register-hospitals.sh", "flwr.sh"):
        _write_script(coordinator / script, _render(script, values))
    for unit in ("pneumofed-superlink.service", "pneumofed-proxy.service"):
        _write_public(coordinator / "systemd" / unit, _render(unit, values))

    hospitals_dir = out_dir / "hospitals"
    stale_kits = sorted(p.name for p in hospitals_dir.iterdir() if p.is_dir() and p.name not in hospital_kits)
    return ProvisionReport(coordinator_kit=coordinator, hospital_kits=hospital_kits, created_keys=created,
                           kept_keys=kept, stale_hospital_kits=stale_kits)


def flower_connection(spec: FederationSpec, ca_certificate: Path) -> str:
    """A Flower `config.toml` whose default connection is the SuperLink's loopback port."""
    return (
        "[superlink]\n"
        f"default = {json.dumps(spec.name)}\n\n"
        f"[superlink.{spec.name}]\n"
        f"address = {json.dumps(_host_port('127.0.0.1', spec.superlink.control_port))}\n"
        f"root-certificates = {json.dumps(str(ca_certificate))}\n"
    )


def _node_config(hospital: HospitalSpec) -> str:
    # TOML basic strings accept JSON string escapes.
    entries = {"data-path": str(hospital.data_path), "site-name": hospital.name, "audit-log": str(hospital.audit_path)}
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in entries.items())


def _current_ca(path: Path, ca_key: pki.PrivateKey, spec: FederationSpec) -> x509.Certificate:
    if path.exists():
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        if certificate.public_key() == ca_key.public_key():
            return certificate
    certificate = pki.create_ca(ca_key, spec.name, spec.ca_validity_days)
    _write_public(path, pki.certificate_pem(certificate))
    return certificate


def _current_server_certificate(
    path: Path, ca_key: pki.PrivateKey, ca_certificate: x509.Certificate, key: pki.PrivateKey, spec: FederationSpec
) -> x509.Certificate:
    """The existing certificate if it still fits (same key, CA and names, not about to expire), else a new one."""
    wanted_names = {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in (*spec.superlink.hosts, *pki.LOOPBACK_NAMES)}
    if path.exists():
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        if (
            certificate.public_key() == key.public_key()
            and certificate.issuer == ca_certificate.subject
            and _signed_by(certificate, ca_certificate)
            and pki.certificate_names(certificate) == wanted_names
            and certificate.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
        ):
            return certificate
    return pki.issue_server_certificate(ca_key, ca_certificate, key, spec.superlink.hosts,
                                        spec.certificate_validity_days)


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _render(template: str, values: Mapping[str, str]) -> str:
    text = resources.files("pneumofed.deploy").joinpath("templates", template).read_text(encoding="utf-8")

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise KeyError(f"template {template} needs {match.group(1)!r}")
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", value, text)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_secret(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=0o600)  # a fresh inode: never widen or reuse an old file's permissions


def _read_secret(path: Path) -> bytes:
    """A kept private key's bytes, after putting its mode back to 0600 (someone may have loosened it).

    Opened without following a symlink, so the mode of a file outside the kit is never changed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise ValueError(f"{path}: cannot open the private key (symlinks are refused): {err.strerror}") from err
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError(f"{path}: a private key must be a regular file")
        os.fchmod(handle.fileno(), 0o600)
        return handle.read()


def _write_public(path: Path, data: bytes | str) -> None:
    atomic_write(path, data, mode=0o644)


def _write_script(path: Path, text: str) -> None:
    atomic_write(path, text, mode=0o755)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
