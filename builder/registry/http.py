"""HTTP for the registry client: TLS trust, proxies, redirects and bounded reads.

Everything a registry (or something pretending to be one) sends back passes through here first. Replies
that are parsed (manifests, tokens, error bodies) are read with a size cap, redirects are followed by hand
so that only http(s) is ever followed, https never drops to http off the machine, and credentials never
travel to a host other than the one they were meant for.
"""

import ipaddress
import os
import ssl
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies

from builder.core.errors import RegistryError

TIMEOUT = (10, 300)  # connect, read
MAX_JSON = 4 << 20  # manifests, indexes and error bodies: a registry sending more is refused
MAX_TOKEN = 1 << 20  # token service replies
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class Transient(Exception):
    """A failure worth another attempt: connection lost, timeout, reply cut off, 5xx, 429."""


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1, with or without a port."""
    hostname = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def cert_dirs(host: str) -> list[Path]:
    """containers' and docker's per-registry trust folders (certs.d/HOST[:PORT]/*.crt), user's first."""
    config = Path(os.environ["XDG_CONFIG_HOME"]) if os.environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return [config / "containers" / "certs.d" / host, Path("/etc/containers/certs.d") / host,
            Path("/etc/docker/certs.d") / host]


def speaks_tls(host: str) -> bool:
    """Registries off the machine always speak https; a loopback one only where a certs.d folder says so."""
    return not is_loopback(host) or any(d.is_dir() for d in cert_dirs(host))


def trust_files(host: str) -> list[Path]:
    """CA files added to the system's roots: REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE and the host's certs.d.
    (SSL_CERT_FILE and SSL_CERT_DIR are read by OpenSSL's default paths themselves.)"""
    files = [Path(os.environ[k]) for k in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if os.environ.get(k)]
    for folder in cert_dirs(host):
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.suffix == ".crt")
    return files


def tls_context(host: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for path in trust_files(host):
        try:
            context.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise RegistryError(f"{path}: cannot load CA certificates: {exc}",
                                "point the variable at a PEM bundle, or fix the certs.d file") from None
    return context


class _Adapter(HTTPAdapter):
    """Uses one TLS context for direct and proxied (CONNECT) connections alike."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **kwargs)


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL, lowercased: what credentials and redirects are compared by."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class Http:
    """One registry host's HTTP: its trust, the environment's proxies, careful redirects."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.session = requests.Session()
        # Not requests' own environment handling: it would also read ~/.netrc and send what it finds.
        self.session.trust_env = False
        self.session.mount("https://", _Adapter(tls_context(host)))

    def send(self, method: str, url: str, *, headers: dict[str, str], body: bytes | Path | None = None,
             stream: bool = False, credentials_for: str = "") -> requests.Response:
        """One request; GET and HEAD follow up to MAX_REDIRECTS redirects. `Authorization` is sent only
        while the URL's origin is `credentials_for`."""
        for _ in range(MAX_REDIRECTS + 1):
            sent = headers if origin_of(url) == credentials_for else \
                {k: v for k, v in headers.items() if k.lower() != "authorization"}
            resp = self._send_once(method, url, sent, body, stream)
            if method not in ("GET", "HEAD") or resp.status_code not in REDIRECTS:
                return resp
            location = resp.headers.get("Location", "")
            resp.close()
            url = self._redirect_target(url, location)
        raise RegistryError(f"registry {self.host}: more than {MAX_REDIRECTS} redirects for {method} "
                            f"{urlsplit(url).path}", "the registry (or a proxy) is misconfigured")

    def _redirect_target(self, url: str, location: str) -> str:
        target = urljoin(url, location)
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(f"registry {self.host} redirected to {target[:80]!r}: only http(s) URLs are followed",
                                "a registry or something in between is sending bad redirects")
        if urlsplit(url).scheme == "https" and parts.scheme == "http" and not is_loopback(parts.netloc):
            raise RegistryError(f"registry {self.host} redirected from https to plain http ({parts.netloc})",
                                "refused: the download would no longer be protected")
        return target

    def _send_once(self, method: str, url: str, headers: dict[str, str], body: bytes | Path | None,
                   stream: bool) -> requests.Response:
        proxies = get_environ_proxies(url)  # HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY
        try:
            with open(body, "rb") if isinstance(body, Path) else nullcontext(body) as data:
                return self.session.request(method, url, headers=headers, data=data, stream=stream,
                                            timeout=TIMEOUT, allow_redirects=False, proxies=proxies)
        except requests.exceptions.SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise RegistryError(
                    f"registry {urlsplit(url).netloc}: its TLS certificate is not trusted here",
                    f"add its CA to {cert_dirs(urlsplit(url).netloc)[0]}/ca.crt or set SSL_CERT_FILE "
                    "(or REQUESTS_CA_BUNDLE) to a bundle that has it") from None
            raise Transient(f"TLS failed: {short(exc)}") from None
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL,
                requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema) as exc:
            raise RegistryError(f"registry {self.host}: cannot send {method} {urlsplit(url).path[:80]}: "
                                f"{type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise Transient(f"{type(exc).__name__}: {short(exc)}") from None


def read_capped(resp: requests.Response, limit: int, what: str) -> bytes:
    """The body of a streamed reply, refused beyond `limit` bytes; a reply cut short is Transient."""
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        resp.close()
        raise RegistryError(f"{what}: the reply is {int(declared)} bytes, more than the {limit >> 20} MiB allowed",
                            "the registry sent something that is not what was asked for")
    data = bytearray()
    try:
        for chunk in resp.iter_content(1 << 16):
            data += chunk
            if len(data) > limit:
                resp.close()
                raise RegistryError(f"{what}: the reply is more than the {limit >> 20} MiB allowed",
                                    "the registry sent something that is not what was asked for")
    except requests.RequestException as exc:
        raise Transient(f"{what}: the reply was cut off ({type(exc).__name__})") from None
    return bytes(data)


def short(exc: Exception) -> str:
    text = str(exc)
    for known in ("Connection refused", "Connection reset by peer", "Connection aborted", "timed out",
                  "RemoteDisconnected", "Broken pipe", "Tunnel connection failed", "IncompleteRead",
                  "Name or service not known", "WRONG_VERSION_NUMBER"):
        if known in text:
            return known
    return text[:160]
