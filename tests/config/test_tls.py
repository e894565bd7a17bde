"""The ``tls`` and ``upstream.tls`` sections: keys, paths, environment, start-up file checks.

Certificates are made by the tests (trustme: a CA and leaf certificates in
memory, written to files); `Certs` is shared with tests/proxy/test_tls.py.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.config import ServerTlsConfig, UpstreamTlsConfig, certificate_validity, load_config
from sidecar.errors import ConfigError
from tests.config.files import REPO, error_of, write

UTC = datetime.UTC


@dataclass
class Certs:
    """A CA and the files of the certificates it issues, in ``root``."""

    root: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    count: int = 0

    def ca_file(self, name: str = "ca.crt") -> Path:
        path = self.root / name
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def issue(
        self,
        name: str,
        *hosts: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[Path, Path]:
        """(certificate file, key file) of a new leaf for ``hosts`` (default: ``name``)."""
        leaf = self.ca.issue_cert(*(hosts or (name,)), not_before=not_before, not_after=not_after)
        cert, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        self.count += 1
        return cert, key


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def _server(certs: Certs, **extra: object) -> dict[str, object]:
    cert, key = certs.issue("server", "localhost", "127.0.0.1")
    return {"cert": cert.name, "key": key.name, **extra}


# the keys


def test_absent_or_null_sections_mean_plaintext(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, {}), environ={}).tls is None
    config = load_config(write(tmp_path, {"tls": None, "upstream": {"tls": None}}), environ={})
    assert config.tls is None
    assert config.upstream.tls is None


def test_server_section_paths_are_relative_to_the_config_file(certs: Certs, tmp_path: Path) -> None:
    certs.ca_file()
    path = write(tmp_path, {"tls": _server(certs, client_ca="ca.crt", min_version=1.3)})
    tls = load_config(path, environ={}).tls
    assert isinstance(tls, ServerTlsConfig)
    assert tls.cert == str(tmp_path / "server.crt")
    assert tls.key == str(tmp_path / "server.key")
    assert tls.client_ca == str(tmp_path / "ca.crt")
    assert tls.min_version == "1.3", "an unquoted 1.3 is a YAML number; it means the version"


def test_upstream_section_defaults_and_paths(certs: Certs, tmp_path: Path) -> None:
    certs.ca_file()
    certs.issue("client")
    data = {"upstream": {"tls": {"ca": "ca.crt", "cert": "client.crt", "key": "client.key"}}}
    tls = load_config(write(tmp_path, data), environ={}).upstream.tls
    assert isinstance(tls, UpstreamTlsConfig)
    assert (tls.ca, tls.cert, tls.key) == tuple(
        str(tmp_path / n) for n in ("ca.crt", "client.crt", "client.key")
    )
    assert tls.server_name is None
    assert tls.verify is True
    empty = load_config(write(tmp_path, {"upstream": {"tls": {}}}), environ={}).upstream.tls
    assert empty == UpstreamTlsConfig(), "tls: {} is TLS with the system's roots"


def test_every_key_is_an_environment_variable(certs: Certs, tmp_path: Path) -> None:
    cert, key = certs.issue("server", "localhost")
    ca = certs.ca_file()
    environ = {
        "SIDECAR_TLS__CERT": str(cert),
        "SIDECAR_TLS__KEY": str(key),
        "SIDECAR_TLS__CLIENT_CA": str(ca),
        "SIDECAR_TLS__MIN_VERSION": "1.3",
        "SIDECAR_UPSTREAM__TLS__CA": str(ca),
        "SIDECAR_UPSTREAM__TLS__CERT": str(cert),
        "SIDECAR_UPSTREAM__TLS__KEY": str(key),
        "SIDECAR_UPSTREAM__TLS__SERVER_NAME": "upstream.internal",
        "SIDECAR_UPSTREAM__TLS__VERIFY": "false",
    }
    config = load_config(None, environ=environ)
    assert config.tls == ServerTlsConfig(
        cert=str(cert), key=str(key), client_ca=str(ca), min_version="1.3"
    )
    assert config.upstream.tls == UpstreamTlsConfig(
        ca=str(ca), cert=str(cert), key=str(key), server_name="upstream.internal", verify=False
    )


def test_environment_paths_are_relative_to_the_working_directory(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs.issue("server", "localhost")
    monkeypatch.chdir(tmp_path)
    environ = {"SIDECAR_TLS__CERT": "server.crt", "SIDECAR_TLS__KEY": "server.key"}
    tls = load_config(None, environ=environ).tls
    assert tls is not None
    assert tls.cert == str(tmp_path / "server.crt")


def test_bad_values_name_their_keys(certs: Certs, tmp_path: Path) -> None:
    message = error_of(tmp_path, {"tls": _server(certs, min_version="1.1")})
    assert "tls.min_version: must be one of 1.2, 1.3" in message
    assert "tls.cert: required key is missing" in error_of(tmp_path, {"tls": {"key": "k"}})
    message = error_of(tmp_path, {"upstream": {"tls": {"cert": "client.crt"}}})
    assert "upstream.tls.key: required with cert" in message
    message = error_of(tmp_path, {"upstream": {"tls": {"key": "client.key"}}})
    assert "upstream.tls.cert: required with key" in message
    assert "upstream.tls.verfy: unknown key" in error_of(
        tmp_path, {"upstream": {"tls": {"verfy": False}}}
    )


# the files, checked at start-up


def test_an_unreadable_file_names_its_key(certs: Certs, tmp_path: Path) -> None:
    message = error_of(tmp_path, {"tls": {"cert": "nothere.crt", "key": "nothere.key"}})
    assert f"tls.cert: cannot read {tmp_path / 'nothere.crt'}: No such file" in message
    message = error_of(tmp_path, {"tls": _server(certs, client_ca="missing-ca.crt")})
    assert "tls.client_ca: cannot read" in message
    message = error_of(tmp_path, {"upstream": {"tls": {"ca": "."}}})
    assert "upstream.tls.ca: is a directory" in message
    message = error_of(
        tmp_path, {"tls": None}, environ={"SIDECAR_UPSTREAM__TLS__CA": str(tmp_path / "no.pem")}
    )
    assert "upstream.tls.ca (from environment variable SIDECAR_UPSTREAM__TLS__CA)" in message


def test_a_key_that_does_not_match_the_certificate_names_the_key(
    certs: Certs, tmp_path: Path
) -> None:
    certs.issue("server", "localhost")
    certs.issue("other", "localhost")
    message = error_of(tmp_path, {"tls": {"cert": "server.crt", "key": "other.key"}})
    assert "tls.key: the private key in" in message
    assert "does not match the certificate in" in message
    data = {"upstream": {"tls": {"cert": "other.crt", "key": "server.key"}}}
    assert "upstream.tls.key: the private key" in error_of(tmp_path, data)


def test_an_expired_or_not_yet_valid_certificate_names_the_key(
    certs: Certs, tmp_path: Path
) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=UTC)
    certs.issue("old", "localhost", not_before=past.replace(year=2019), not_after=past)
    message = error_of(tmp_path, {"tls": {"cert": "old.crt", "key": "old.key"}})
    assert "tls.cert: the certificate in" in message
    assert "expired on 2020-01-01 00:00:00 UTC" in message
    future = datetime.datetime.now(UTC) + datetime.timedelta(days=30)
    certs.issue("early", "client", not_before=future, not_after=future + datetime.timedelta(1))
    data = {"upstream": {"tls": {"cert": "early.crt", "key": "early.key"}}}
    assert "upstream.tls.cert: the certificate in" in error_of(tmp_path, data)
    assert "is not valid before" in error_of(tmp_path, data)


def test_files_that_are_not_pem_name_their_key(certs: Certs, tmp_path: Path) -> None:
    certs.issue("server", "localhost")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    message = error_of(tmp_path, {"tls": {"cert": "junk.pem", "key": "server.key"}})
    assert "tls.cert: no certificate (PEM) in" in message
    message = error_of(tmp_path, {"tls": {"cert": "server.crt", "key": "junk.pem"}})
    assert "tls.key: cannot use the private key in" in message
    message = error_of(tmp_path, {"tls": _server(certs, client_ca="junk.pem")})
    assert "tls.client_ca: no usable CA certificate (PEM) in" in message


def test_certificate_validity_reads_the_dates_cryptography_reads(certs: Certs) -> None:
    start = datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)
    end = datetime.datetime(2061, 7, 8, 9, 10, 11, tzinfo=UTC)  # GeneralizedTime after 2049
    for not_after in (end, datetime.datetime(2030, 1, 1, tzinfo=UTC)):
        cert, _ = certs.issue("dated", "localhost", not_before=start, not_after=not_after)
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        der = parsed.public_bytes(Encoding.DER)
        assert certificate_validity(der) == (
            parsed.not_valid_before_utc,
            parsed.not_valid_after_utc,
        )
    with pytest.raises(ValueError, match="DER"):
        certificate_validity(b"\x30\x03\x02\x01")


def test_sidecar_run_with_an_expired_certificate_exits_2_naming_the_key(
    certs: Certs, tmp_path: Path
) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=UTC)
    certs.issue("old", "localhost", not_before=past.replace(year=2019), not_after=past)
    path = write(
        tmp_path,
        {
            "listen": "127.0.0.1:0",
            "metrics": {"listen": None},
            "upstream": {"addresses": ["127.0.0.1:1"]},
            "tls": {"cert": "old.crt", "key": "old.key"},
        },
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert f"invalid configuration in {path}: tls.cert: the certificate in" in done.stderr
    assert "expired on 2020-01-01" in done.stderr


def test_check_config_reports_a_mismatched_key(certs: Certs, tmp_path: Path) -> None:
    certs.issue("server", "localhost")
    certs.issue("other", "localhost")
    path = write(
        tmp_path,
        {
            "upstream": {"addresses": ["127.0.0.1:1"]},
            "tls": {"cert": "server.crt", "key": "other.key"},
        },
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2, done.stderr
    assert "tls.key: the private key in" in done.stderr


def test_a_reload_with_a_broken_certificate_is_a_config_error(certs: Certs, tmp_path: Path) -> None:
    path = write(tmp_path, {"tls": _server(certs)})
    assert load_config(path, environ={}).tls is not None
    (tmp_path / "server.crt").write_text("truncated\n")
    with pytest.raises(ConfigError, match=r"tls\.cert: no certificate"):
        load_config(path, environ={})
