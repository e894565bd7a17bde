"""The ``tls`` and ``upstream.tls`` sections: their models, paths and start-up checks.

Both sections are optional: absent or null means plaintext on that side.
Paths are relative to the config file, like ``idl``. `check_tls_files` reads
every file once when the config is loaded, so that a missing file, a key that
does not match its certificate or an expired certificate stops the start (or
rejects a reload) with a message that names the key.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from sidecar.config.base import FieldProblem, KeyPath, Section


def _version_text(value: Any) -> Any:
    """``min_version: 1.2`` unquoted is a YAML number; it means the string."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class ServerTlsConfig(Section):
    """TLS on the listener that Thrift clients connect to; null by default (plaintext)."""

    cert: str = Field(
        description="The listener's certificate (PEM; the chain may follow it). "
        "Relative to this file."
    )
    key: str = Field(description="The private key of cert (PEM, unencrypted).")
    client_ca: str | None = Field(
        None,
        description="CA certificates (PEM); when set, every client must present a "
        "certificate signed by one of them (mutual TLS).",
    )
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_version_text)] = Field(
        "1.2", description="Oldest TLS version accepted from clients."
    )


class UpstreamTlsConfig(Section):
    """TLS on the connections to the upstream. The section is null by default: plaintext."""

    ca: str | None = Field(
        None,
        description="CA certificates (PEM) that the upstream's certificate must chain to; "
        "null uses the system's roots.",
    )
    cert: str | None = Field(
        None, description="Client certificate (PEM) for upstreams that require mutual TLS."
    )
    key: str | None = Field(None, description="The private key of cert (PEM, unencrypted).")
    server_name: str | None = Field(
        None,
        description="Name sent as SNI and checked against the upstream's certificate; "
        "null uses the host of each upstream address.",
    )
    verify: bool = Field(
        True,
        description="Verify the upstream's certificate and name; false accepts any "
        "certificate (testing only).",
    )

    @model_validator(mode="after")
    def _cert_and_key(self) -> UpstreamTlsConfig:
        if self.cert is not None and self.key is None:
            raise FieldProblem("key", "required with cert: the private key of the certificate")
        if self.key is not None and self.cert is None:
            raise FieldProblem("cert", "required with key: the certificate of the private key")
        return self


# The path keys of each section, and what kind of file each one names.
SERVER_FILES = ("cert", "key", "client_ca")
UPSTREAM_FILES = ("ca", "cert", "key")


def tls_sections(config: Any) -> Iterator[tuple[KeyPath, Section]]:
    """(key path, section) of each TLS section that is set in ``config`` (a SidecarConfig)."""
    if config.tls is not None:
        yield ("tls",), config.tls
    if config.upstream.tls is not None:
        yield ("upstream", "tls"), config.upstream.tls


def with_absolute_paths(
    section: Section, base_for: Callable[[KeyPath], Path], at: KeyPath
) -> Section:
    """``section`` with its relative file paths made absolute against ``base_for(key path)``."""
    names = SERVER_FILES if isinstance(section, ServerTlsConfig) else UPSTREAM_FILES
    updates: dict[str, str] = {}
    for name in names:
        value = getattr(section, name)
        if value is not None and not Path(value).is_absolute():
            updates[name] = str((base_for((*at, name)) / value).resolve())
    return section.model_copy(update=updates) if updates else section


class TlsFileProblem(Exception):
    """A TLS file that cannot be used; ``key`` is the config key that names it."""

    def __init__(self, key: KeyPath, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_tls_files(at: KeyPath, section: Section, now: datetime.datetime | None = None) -> None:
    """Read every file the section names, as the sidecar will at start-up.

    Raises:
        TlsFileProblem: unreadable or not PEM, a key that does not match its
            certificate, a certificate not yet valid or expired, unusable CA file.
    """
    moment = now or datetime.datetime.now(datetime.UTC)
    cert: str | None
    key: str | None
    if isinstance(section, ServerTlsConfig):
        cert, key, cas = section.cert, section.key, (("client_ca", section.client_ca),)
    elif isinstance(section, UpstreamTlsConfig):
        cert, key, cas = section.cert, section.key, (("ca", section.ca),)
    else:  # pragma: no cover - only the two sections exist
        raise TypeError(type(section).__name__)
    for name, path in (("cert", cert), ("key", key), *cas):
        if path is not None:
            _readable((*at, name), path)
    if cert is not None and key is not None:
        _check_pair(at, cert, key)
        _check_dates((*at, "cert"), cert, moment)
    for name, path in cas:
        if path is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=path)
            except ssl.SSLError as exc:
                raise TlsFileProblem(
                    (*at, name), f"no usable CA certificate (PEM) in {path}: {_reason(exc)}"
                ) from None


def _readable(key: KeyPath, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except IsADirectoryError:
        raise TlsFileProblem(key, f"is a directory: {path}") from None
    except OSError as exc:
        raise TlsFileProblem(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _check_pair(at: KeyPath, cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = _reason(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "values mismatch" in reason:
            raise TlsFileProblem(
                (*at, "key"),
                f"the private key in {key} does not match the certificate in {cert} "
                f"({'.'.join((*at, 'cert'))})",
            ) from None
        if not _pem_certificates(cert):
            raise TlsFileProblem((*at, "cert"), f"no certificate (PEM) in {cert}") from None
        raise TlsFileProblem(
            (*at, "key"), f"cannot use the private key in {key}: {reason}"
        ) from None


def _check_dates(key: KeyPath, path: str, now: datetime.datetime) -> None:
    blocks = _pem_certificates(path)
    if not blocks:
        raise TlsFileProblem(key, f"no certificate (PEM) in {path}")
    try:
        not_before, not_after = certificate_validity(ssl.PEM_cert_to_DER_cert(blocks[0]))
    except ValueError as exc:
        raise TlsFileProblem(key, f"cannot read the certificate in {path}: {exc}") from None
    if now > not_after:
        raise TlsFileProblem(
            key, f"the certificate in {path} expired on {not_after:%Y-%m-%d %H:%M:%S} UTC"
        )
    if now < not_before:
        raise TlsFileProblem(
            key,
            f"the certificate in {path} is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC",
        )


def _pem_certificates(path: str) -> list[str]:
    text = Path(path).read_text(encoding="ascii", errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    blocks = []
    start = text.find(begin)
    while start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            break
        blocks.append(text[start : stop + len(end)] + "\n")
        start = text.find(begin, stop)
    return blocks


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _der_time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 4.1.2.5.1)
        moment = datetime.datetime.strptime(text, "%y%m%d%H%M%SZ")
        if moment.year >= 2050:
            moment = moment.replace(year=moment.year - 100)
    elif tag == 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError(f"unexpected time tag 0x{tag:02x}")
    return moment.replace(tzinfo=datetime.UTC)


def certificate_validity(der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter) of an X.509 certificate in DER (RFC 5280 4.1)."""
    _, cert_start, _ = _der_item(der, 0)  # Certificate ::= SEQUENCE
    _, pos, _ = _der_item(der, cert_start)  # tbsCertificate ::= SEQUENCE
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _der_item(der, pos)
    tag, validity, _ = _der_item(der, pos)
    if tag != 0x30:
        raise ValueError("no validity in the certificate")
    tag_before, start, end = _der_item(der, validity)
    not_before = _der_time(tag_before, der[start:end])
    tag_after, start, end = _der_item(der, end)
    return not_before, _der_time(tag_after, der[start:end])
