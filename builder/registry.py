"""A small OCI distribution client over HTTP: blobs, manifests, tags, with bounded retries.

Credentials come only from the standard files (containers auth.json, docker config.json) and are sent
only to the registry that asked for them; they never reach a log, a label or an argv.
"""

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import requests

from builder.errors import RecipeError, RegistryError

log = logging.getLogger("builder")
T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

ATTEMPTS = 3  # every request that may fail transiently is tried at most this often
BACKOFF = 0.5  # seconds before the second attempt, doubled for each further one
TIMEOUT = (10, 300)  # connect, read

_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Repository:
    """HOST[:PORT]/NAME: where images go. Loopback hosts are spoken to over plain HTTP."""

    host: str
    name: str

    @classmethod
    def parse(cls, text: str, option: str = "--registry") -> "Repository":
        host, _, name = text.partition("/")
        if not name or not ("." in host or ":" in host or host == "localhost"):
            raise RecipeError(f"{option} {text!r}: expected HOST/REPOSITORY, e.g. ghcr.io/OWNER/builder",
                              "the host part must name a registry (a dot, a port or localhost)")
        if not _REPO.match(name):
            raise RecipeError(f"{option} {text!r}: {name!r} is not a valid repository name",
                              "lowercase letters, digits and . _ - separators, / between components")
        return cls(host, name)

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"

    @property
    def plain_http(self) -> bool:
        hostname = self.host.rsplit(":", 1)[0].strip("[]") if not self.host.startswith("[") else \
            self.host[1:].split("]")[0]
        if hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(hostname).is_loopback
        except ValueError:
            return False

    @property
    def base_url(self) -> str:
        # Docker Hub's references say docker.io; its registry API answers on another host.
        host = "registry-1.docker.io" if self.host == "docker.io" else self.host
        return f"{'http' if self.plain_http else 'https'}://{host}/v2/{self.name}"


def parse_reference(text: str) -> tuple[Repository, str]:
    """HOST/REPO:TAG or HOST/REPO@sha256:… -> (repository, tag or digest)."""
    if "@" in text:
        repo, ref = text.rsplit("@", 1)
        if not _DIGEST.match(ref):
            raise RecipeError(f"{text!r}: the digest must be sha256:<64 hex digits>")
    else:
        last = text.rsplit("/", 1)[-1]
        if ":" not in last:
            raise RecipeError(f"{text!r}: needs a tag or a digest (HOST/REPO:TAG or HOST/REPO@sha256:…)")
        repo, ref = text.rsplit(":", 1)
        if not _TAG.match(ref):
            raise RecipeError(f"{text!r}: {ref!r} is not a valid tag")
    return Repository.parse(repo, "reference"), ref


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise RecipeError(f"tag {tag!r} is not valid", "letters, digits, _ . -; at most 128; no leading . or -")
    return tag


def at(repo: Repository, ref: str) -> str:
    """repo:tag or repo@digest, for messages."""
    return f"{repo}{'@' if ref.startswith('sha256:') else ':'}{ref}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- credentials ---------------------------------------------------------------------------------------

def auth_files() -> list[Path]:
    """The standard credential files, in the order podman and docker read them."""
    env = os.environ
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/containers/{os.getuid()}"
    files.append(Path(runtime) / "containers" / "auth.json" if env.get("XDG_RUNTIME_DIR")
                 else Path(runtime) / "auth.json")
    config = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    files.append(config / "containers" / "auth.json")
    docker = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    files.append(docker / "config.json")
    return files


def _keys_for(repo: Repository) -> Iterator[str]:
    """Most specific first: host/ns/repo, host/ns, host, then docker's URL spellings of the host."""
    parts = repo.name.split("/")
    for i in range(len(parts), 0, -1):
        yield f"{repo.host}/{'/'.join(parts[:i])}"
    yield repo.host
    yield f"https://{repo.host}"
    yield f"http://{repo.host}"


def find_credentials(repo: Repository) -> tuple[str, str, Path] | None:
    """(user, secret, file) for the repository from the first standard file that has an entry."""
    for path in auth_files():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path}: cannot read credentials: {exc}", "fix or remove the file") from None
        auths = data.get("auths") if isinstance(data, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in _keys_for(repo):
            entry = auths.get(key) or auths.get(key + "/v1/") or auths.get(key + "/v2/")
            if isinstance(entry, dict) and entry.get("auth"):
                try:
                    user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    raise RegistryError(f"{path}: auths.{key}.auth is not base64 of USER:SECRET") from None
                return user, secret, path
    return None


# --- the client ----------------------------------------------------------------------------------------

class _Transient(Exception):
    """A failure worth another attempt: connection lost, timeout, 5xx, 429."""


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class RegistryClient:
    """Speaks the OCI distribution API to one repository."""

    def __init__(self, repo: Repository, *, push: bool = False) -> None:
        self.repo = repo
        self.push = push
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies from the environment: we talk to the registry itself
        self._auth: str | None = None
        self._creds = find_credentials(repo)

    # Requests ------------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return path if "://" in path else f"{self.repo.base_url}/{path}"

    def _authenticate(self, resp: requests.Response) -> None:
        scheme, params = _challenge(resp.headers.get("WWW-Authenticate", ""))
        if self._creds is None and scheme == "basic":
            raise RegistryError(
                f"registry {self.repo.host} needs credentials for {self.repo.name} and none were found",
                f"log in first (podman login {self.repo.host}); looked in: "
                + ", ".join(str(p) for p in auth_files()))
        if scheme == "basic" and self._creds:
            token = base64.b64encode(f"{self._creds[0]}:{self._creds[1]}".encode()).decode()
            self._auth = f"Basic {token}"
            return
        if scheme == "bearer" and "realm" in params:
            scope = f"repository:{self.repo.name}:{'pull,push' if self.push else 'pull'}"
            query = {"service": params.get("service", ""), "scope": scope}
            auth = (self._creds[0], self._creds[1]) if self._creds else None
            try:
                reply = self.session.get(params["realm"], params=query, auth=auth, timeout=TIMEOUT)
            except requests.RequestException as exc:
                raise _Transient(f"token service unreachable: {type(exc).__name__}") from None
            if reply.status_code >= 500:
                raise _Transient(f"token service answered {reply.status_code}")
            if reply.status_code != 200:
                raise self._refused(reply.status_code)
            body = reply.json()
            self._auth = f"Bearer {body.get('token') or body.get('access_token')}"
            return
        raise RegistryError(f"registry {self.repo.host} asked for authentication it did not describe "
                            f"({scheme or 'no WWW-Authenticate header'})")

    def _refused(self, status: int) -> RegistryError:
        if self._creds is None:
            return RegistryError(f"registry {self.repo.host} refused access to {self.repo.name} ({status}) "
                                 "and no credentials were found",
                                 f"log in first (podman login {self.repo.host})")
        return RegistryError(f"registry {self.repo.host} refused the credentials for user {self._creds[0]!r} "
                             f"from {self._creds[2]} ({status} on {self.repo.name})",
                             f"log in again (podman login {self.repo.host}) or check push rights")

    def request(self, method: str, path: str, *, ok: tuple[int, ...], headers: dict[str, str] | None = None,
                body: bytes | Path | None = None, stream: bool = False,
                what: str = "") -> requests.Response:
        """One API call, authenticated on demand. Transient failures raise _Transient (see `attempt`)."""
        for _ in range(2):  # the second pass carries credentials after a 401
            sent = dict(headers or {})
            if self._auth:
                sent["Authorization"] = self._auth
            log.debug("registry: %s %s", method, self._url(path).split("?")[0])
            try:
                with open(body, "rb") if isinstance(body, Path) else nullcontext(body) as data:
                    resp = self.session.request(method, self._url(path), headers=sent, data=data, stream=stream,
                                                timeout=TIMEOUT, allow_redirects=True)
            except requests.RequestException as exc:
                raise _Transient(f"{type(exc).__name__}: {_short(exc)}") from None
            if resp.status_code == 401 and self._auth is None:
                self._authenticate(resp)
                continue
            if resp.status_code in (401, 403):
                raise self._refused(resp.status_code)
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Transient(f"{resp.status_code} {resp.reason} on {method} {what or path.split('?')[0]}")
            if resp.status_code not in ok:
                raise RegistryError(f"registry {self.repo.host}: {method} {what or path.split('?')[0]} answered "
                                    f"{resp.status_code}: {_error_text(resp)}")
            return resp
        raise self._refused(401)

    def attempt(self, what: str, action: Callable[[], T]) -> T:
        """Run `action` up to ATTEMPTS times while it fails transiently; then one clear error."""
        last = ""
        for number in range(ATTEMPTS):
            if number:
                time.sleep(BACKOFF * 2 ** (number - 1))
            try:
                return action()
            except _Transient as exc:
                last = str(exc)
                log.debug("registry: %s failed (%s), attempt %d of %d", what, last, number + 1, ATTEMPTS)
        raise RegistryError(f"registry {self.repo.host}: {what} failed after {ATTEMPTS} attempts: {last}",
                            "check that the registry is up and healthy, then run the command again")

    # Operations ----------------------------------------------------------------------------------------

    def manifest_digest(self, ref: str) -> str | None:
        """The digest the registry serves for a tag or digest, or None when it has none."""
        def head() -> str | None:
            resp = self.request("HEAD", f"manifests/{ref}", ok=(200, 404),
                                headers={"Accept": ", ".join(MANIFEST_TYPES)}, what=f"manifest {ref}")
            if resp.status_code == 404:
                return None
            digest = resp.headers.get("Docker-Content-Digest")
            if digest:
                return digest
            return sha256_digest(self.get_manifest(ref)[0])
        return self.attempt(f"looking up {at(self.repo, ref)}", head)

    def get_manifest(self, ref: str) -> tuple[bytes, str]:
        """(bytes, media type) of a manifest; RegistryError when it is absent."""
        def get() -> tuple[bytes, str]:
            resp = self.request("GET", f"manifests/{ref}", ok=(200, 404),
                                headers={"Accept": ", ".join(MANIFEST_TYPES)}, what=f"manifest {ref}")
            if resp.status_code == 404:
                raise RegistryError(f"registry {self.repo.host}: {self.repo.name} has no manifest {ref!r}")
            return resp.content, resp.headers.get("Content-Type", "").split(";")[0]
        return self.attempt(f"fetching manifest {at(self.repo, ref)}", get)

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag or its digest; returns the digest the registry computed."""
        expected = sha256_digest(data)

        def put() -> str:
            resp = self.request("PUT", f"manifests/{ref}", ok=(201, 200), headers={"Content-Type": media_type},
                                body=data, what=f"manifest {ref}")
            return resp.headers.get("Docker-Content-Digest") or expected
        digest = self.attempt(f"storing manifest {at(self.repo, ref)}", put)
        if digest != expected:
            raise RegistryError(f"registry {self.repo.host} stored manifest {ref} as {digest}, expected {expected}")
        return digest

    def has_blob(self, digest: str) -> bool:
        return self.attempt(f"checking blob {digest[:19]}", lambda: self.request(
            "HEAD", f"blobs/{digest}", ok=(200, 404), what=f"blob {digest[:19]}").status_code == 200)

    def push_blob(self, digest: str, size: int, content: bytes | Path) -> bool:
        """Upload a blob unless the registry has it (monolithic POST + PUT). True when it was sent."""
        if self.has_blob(digest):
            return False

        def upload() -> None:
            start = self.request("POST", "blobs/uploads/", ok=(202,), what="blob upload start")
            location = start.headers.get("Location")
            if not location:
                raise RegistryError(f"registry {self.repo.host} started an upload without a Location header")
            url = urljoin(f"{self.repo.base_url}/", location)
            url += ("&" if "?" in url else "?") + f"digest={digest}"
            self.request("PUT", url, ok=(201,), body=content, what=f"blob {digest[:19]} ({size} bytes)",
                         headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        self.attempt(f"uploading blob {digest[:19]} ({size} bytes)", upload)
        return True

    def fetch_blob(self, digest: str, dest: Path) -> None:
        """Download a blob to `dest`, checking its digest while writing."""
        def get() -> None:
            resp = self.request("GET", f"blobs/{digest}", ok=(200, 404), stream=True, what=f"blob {digest[:19]}")
            if resp.status_code == 404:
                raise RegistryError(f"registry {self.repo.host}: {self.repo.name} has no blob {digest}")
            hasher = hashlib.sha256()
            try:
                with open(dest, "wb") as f:
                    for chunk in resp.iter_content(1 << 20):
                        hasher.update(chunk)
                        f.write(chunk)
            except requests.RequestException as exc:
                raise _Transient(f"download cut off: {type(exc).__name__}") from None
            if f"sha256:{hasher.hexdigest()}" != digest:
                dest.unlink(missing_ok=True)
                raise RegistryError(f"registry {self.repo.host}: blob {digest} arrived with another digest",
                                    "the registry or something between us altered it; nothing was placed")
        self.attempt(f"downloading blob {digest[:19]}", get)

    def supports_referrers(self, digest: str) -> bool:
        def get() -> bool:
            resp = self.request("GET", f"referrers/{digest}", ok=(200, 404, 400, 405), what="referrers")
            return resp.status_code == 200 and resp.headers.get("Content-Type", "").startswith(OCI_INDEX)
        return self.attempt("probing the referrers API", get)


def _short(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"(Connection refused|Connection reset by peer|Connection aborted|timed out|"
                      r"RemoteDisconnected[^']*|Broken pipe)", text)
    return match.group(1) if match else text[:160]


def _error_text(resp: requests.Response) -> str:
    try:
        errors: Any = resp.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or resp.reason
    except ValueError:
        return resp.reason or ""
