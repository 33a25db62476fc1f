"""A small OCI distribution client over HTTP: blobs, manifests, tags, with bounded retries.

Credentials come from the standard files and the credential helpers they name (registry/credentials.py) and are
sent only to the registry that asked for them and its token service; they never reach a log, a label or
an argv. What the registry answers is checked before it is used: manifests by media type, size and digest,
blobs by digest and size, tokens by size and shape (registry/http.py reads and redirects).
"""

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from builder.core.digests import sha256_digest
from builder.core.errors import RecipeError, RegistryError
from builder.registry import credentials
from builder.registry.credentials import Credentials, auth_files
from builder.registry.http import MAX_JSON, MAX_TOKEN, Http, Transient, is_loopback, origin_of, read_capped, speaks_tls

log = logging.getLogger("builder")
T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

ATTEMPTS = 3  # every request that may fail transiently is tried at most this often
BACKOFF = 0.5  # seconds before the second attempt, doubled for each further one
MONOLITHIC = 64 << 20  # blobs up to this size go in one PUT; larger ones in resumable chunks
CHUNK = 32 << 20
TOKEN_LIFETIME = 60  # seconds, when the token service does not say (the distribution spec's default)

_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*\Z")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")


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
        if not _REPO.fullmatch(name):
            raise RecipeError(f"{option} {text!r}: {name!r} is not a valid repository name",
                              "lowercase letters, digits and . _ - separators, / between components")
        return cls(host, name)

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"

    @property
    def plain_http(self) -> bool:
        """Loopback registries speak plain HTTP unless a certs.d folder for them gives their CA."""
        return not speaks_tls(self.host)

    @property
    def base_url(self) -> str:
        # Docker Hub's references say docker.io; its registry API answers on another host.
        host = "registry-1.docker.io" if self.host == "docker.io" else self.host
        return f"{'http' if self.plain_http else 'https'}://{host}/v2/{self.name}"


def parse_reference(text: str) -> tuple[Repository, str]:
    """HOST/REPO:TAG or HOST/REPO@sha256:… -> (repository, tag or digest)."""
    if "@" in text:
        repo, ref = text.rsplit("@", 1)
        if not _DIGEST.fullmatch(ref):
            raise RecipeError(f"{text!r}: the digest must be sha256:<64 hex digits>")
    else:
        last = text.rsplit("/", 1)[-1]
        if ":" not in last:
            raise RecipeError(f"{text!r}: needs a tag or a digest (HOST/REPO:TAG or HOST/REPO@sha256:…)")
        repo, ref = text.rsplit(":", 1)
        if not _TAG.fullmatch(ref):
            raise RecipeError(f"{text!r}: {ref!r} is not a valid tag")
    return Repository.parse(repo, "reference"), ref


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise RecipeError(f"tag {tag!r} is not valid", "letters, digits, _ . -; at most 128; no leading . or -")
    return tag


def at(repo: Repository, ref: str) -> str:
    """repo:tag or repo@digest, for messages."""
    return f"{repo}{'@' if ref.startswith('sha256:') else ':'}{ref}"


def find_credentials(repo: Repository) -> Credentials | None:
    return credentials.find_credentials(repo.host, repo.name)


# --- the client ----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"^[\x21-\x7e]{1,65536}\Z")  # what may stand after "Bearer " in a header


def _basic(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.user}:{creds.secret}".encode()).decode()


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


@dataclass
class _Bearer:
    challenge: dict[str, str]  # realm and service, to renew the token before it runs out
    renew_at: float  # time.monotonic()


class RegistryClient:
    """Speaks the OCI distribution API to one repository."""

    def __init__(self, repo: Repository, *, push: bool = False) -> None:
        self.repo = repo
        self.push = push
        self.http = Http(repo.host)
        self.origin = origin_of(repo.base_url)
        self._auth: str | None = None
        self._bearer: _Bearer | None = None

    @cached_property
    def _creds(self) -> Credentials | None:
        """Looked up when a registry first asks, so a helper runs only where it is needed."""
        return find_credentials(self.repo)

    # Requests ------------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return path if "://" in path else f"{self.repo.base_url}/{path}"

    def _authenticate(self, resp: requests.Response) -> None:
        scheme, params = _challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            creds = self._creds
            if creds is None:
                raise RegistryError(
                    f"registry {self.repo.host} needs credentials for {self.repo.name} and none were found",
                    f"log in first (podman login {self.repo.host}); looked in: "
                    + ", ".join(str(p) for p in auth_files()))
            self._auth = _basic(creds)
            return
        if scheme == "bearer" and params.get("realm"):
            self._fetch_token(params)
            return
        raise RegistryError(f"registry {self.repo.host} asked for authentication it did not describe "
                            f"({scheme or 'no WWW-Authenticate header'})")

    def _fetch_token(self, challenge: dict[str, str]) -> None:
        """A Bearer token from the token service the registry named (GHCR, Docker Hub, distribution's
        `auth: token`): GET with Basic credentials, or the OAuth2 POST for an identity token."""
        realm = challenge["realm"]
        parts = urlsplit(realm)
        service = f"token service {parts.netloc or realm[:60]!r} of {self.repo.host}"
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(f"registry {self.repo.host}: its {service} is not an http(s) URL",
                                "the registry's WWW-Authenticate header is wrong or forged")
        creds = self._creds
        if parts.scheme == "http" and creds is not None and not is_loopback(parts.netloc):
            raise RegistryError(f"registry {self.repo.host}: its {service} is plain http; credentials are not "
                                "sent in the clear", "use the registry's https address")
        scope = f"repository:{self.repo.name}:{'pull,push' if self.push else 'pull'}"
        query = {"scope": scope, **({"service": challenge["service"]} if challenge.get("service") else {})}
        headers: dict[str, str] = {}
        if creds is not None and creds.user == credentials.IDENTITY_TOKEN_USER:
            form = {**query, "grant_type": "refresh_token", "refresh_token": creds.secret, "client_id": "builder"}
            method, url, body = "POST", realm, urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            method, body = "GET", None
            url = realm + ("&" if "?" in realm else "?") + urlencode(query)
            if creds is not None:
                headers["Authorization"] = _basic(creds)
        resp = self.http.send(method, url, headers=headers, body=body.encode() if isinstance(body, str) else None,
                              stream=True, credentials_for=origin_of(realm))
        if resp.status_code >= 500 or resp.status_code == 429:
            resp.close()
            raise Transient(f"{service} answered {resp.status_code}")
        if resp.status_code in (401, 403):
            resp.close()
            raise self._refused(resp.status_code)
        if resp.status_code != 200:
            resp.close()
            raise RegistryError(f"registry {self.repo.host}: {service} answered {resp.status_code}")
        data = read_capped(resp, MAX_TOKEN, f"registry {self.repo.host}: {service}")
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise RegistryError(f"registry {self.repo.host}: {service} answered something that is not a JSON "
                                "object", "the token service is broken or is not one")
        token = reply.get("token") or reply.get("access_token")
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise RegistryError(f"registry {self.repo.host}: {service} answered without a usable token",
                                "the token service is broken or is not one")
        lifetime = reply.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = TOKEN_LIFETIME
        self._auth = f"Bearer {token}"
        self._bearer = _Bearer(challenge, time.monotonic() + max(lifetime - 10, lifetime / 2))

    def _refused(self, status: int) -> RegistryError:
        creds = self._creds
        if creds is None:
            return RegistryError(f"registry {self.repo.host} refused access to {self.repo.name} ({status}) "
                                 "and no credentials were found",
                                 f"log in first (podman login {self.repo.host})")
        return RegistryError(f"registry {self.repo.host} refused the credentials for user {creds.user!r} "
                             f"from {creds.source} ({status} on {self.repo.name})",
                             f"log in again (podman login {self.repo.host}) or check push rights")

    def request(self, method: str, path: str, *, ok: tuple[int, ...], headers: dict[str, str] | None = None,
                body: bytes | Path | None = None, stream: bool = False,
                what: str = "") -> requests.Response:
        """One API call, authenticated on demand (once more when a token ran out). Transient failures
        raise Transient (see `attempt`)."""
        url = self._url(path)
        label = what or urlsplit(url).path
        authenticated = False
        while True:
            if self._bearer is not None and time.monotonic() >= self._bearer.renew_at:
                self._fetch_token(self._bearer.challenge)  # renewed ahead of its expiry
            sent = dict(headers or {})
            if self._auth:
                sent["Authorization"] = self._auth
            log.debug("registry: %s %s", method, url.split("?")[0])
            # Always streamed: a body is read only with a cap (here for callers that do not read it).
            resp = self.http.send(method, url, headers=sent, body=body, stream=True, credentials_for=self.origin)
            status = resp.status_code
            if status == 401 and not authenticated and origin_of(resp.url or url) == self.origin:
                authenticated = True
                resp.close()
                self._authenticate(resp)
                continue
            if status in (401, 403):
                resp.close()
                raise self._refused(status)
            if status >= 500 or status == 429:
                resp.close()
                raise Transient(f"{status} {resp.reason} on {method} {label}")
            if status not in ok:
                raise RegistryError(f"registry {self.repo.host}: {method} {label} answered {status}: "
                                    f"{_error_text(resp)}")
            if method == "HEAD":  # no body; its Content-Length is the size of what a GET would send
                resp.close()
            elif not stream:
                read_capped(resp, MAX_JSON, f"registry {self.repo.host}: {method} {label}")
            return resp

    def attempt(self, what: str, action: Callable[[], T]) -> T:
        """Run `action` up to ATTEMPTS times while it fails transiently; then one clear error."""
        last = ""
        for number in range(ATTEMPTS):
            if number:
                time.sleep(BACKOFF * 2 ** (number - 1))
            try:
                return action()
            except Transient as exc:
                last = str(exc)
                log.debug("registry: %s failed (%s), attempt %d of %d", what, last, number + 1, ATTEMPTS)
        raise RegistryError(f"registry {self.repo.host}: {what} failed after {ATTEMPTS} attempts: {last}",
                            "check that the registry is up and healthy, then run the command again")

    # Manifests -----------------------------------------------------------------------------------------

    def manifest_digest(self, ref: str) -> str | None:
        """The digest the registry serves for a tag or digest, or None when it has none."""
        def head() -> str | None:
            resp = self.request("HEAD", f"manifests/{ref}", ok=(200, 404),
                                headers={"Accept": ", ".join(MANIFEST_TYPES)}, what=f"manifest {ref}")
            if resp.status_code == 404:
                return None
            digest = resp.headers.get("Docker-Content-Digest", "")
            if _DIGEST.fullmatch(digest) and (digest == ref or not _DIGEST.fullmatch(ref)):
                return digest
            return sha256_digest(self.get_manifest(ref)[0])  # no (or an odd) header: the bytes decide
        return self.attempt(f"looking up {at(self.repo, ref)}", head)

    def get_manifest(self, ref: str) -> tuple[bytes, str]:
        """(bytes, media type) of a manifest, checked: a manifest type, at most MAX_JSON bytes, a JSON
        object, and the digest asked for (or announced). RegistryError when absent or not right."""
        where = f"registry {self.repo.host}: manifest {at(self.repo, ref)}"

        def get() -> tuple[bytes, str, str]:
            resp = self.request("GET", f"manifests/{ref}", ok=(200, 404), stream=True,
                                headers={"Accept": ", ".join(MANIFEST_TYPES)}, what=f"manifest {ref}")
            if resp.status_code == 404:
                resp.close()
                raise RegistryError(f"registry {self.repo.host}: {self.repo.name} has no manifest {ref!r}")
            data = read_capped(resp, MAX_JSON, where)
            return data, resp.headers.get("Content-Type", "").split(";")[0].strip(), \
                resp.headers.get("Docker-Content-Digest", "")
        data, header_type, announced = self.attempt(f"fetching manifest {at(self.repo, ref)}", get)
        return data, check_manifest(data, header_type, announced, ref, where)

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag or its digest; returns the digest the registry computed."""
        expected = sha256_digest(data)

        def put() -> str:
            resp = self.request("PUT", f"manifests/{ref}", ok=(201, 200), headers={"Content-Type": media_type},
                                body=data, what=f"manifest {ref}")
            return resp.headers.get("Docker-Content-Digest") or expected
        digest = self.attempt(f"storing manifest {at(self.repo, ref)}", put)
        if digest != expected:
            raise RegistryError(f"registry {self.repo.host} stored manifest {ref} as {digest[:80]}, "
                                f"expected {expected}")
        return digest

    # Blobs ---------------------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return self.attempt(f"checking blob {digest[:19]}", lambda: self.request(
            "HEAD", f"blobs/{digest}", ok=(200, 404), what=f"blob {digest[:19]}").status_code == 200)

    def _location(self, resp: requests.Response, url: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.repo.host} answered an upload step without a Location header")
        target = urljoin(url, location)
        if urlsplit(target).scheme not in ("http", "https"):
            raise RegistryError(f"registry {self.repo.host} sent an upload to {target[:80]!r}: not an http(s) URL")
        return target

    def push_blob(self, digest: str, size: int, content: bytes | Path) -> bool:
        """Upload a blob unless the registry has it. True when it was sent. Blobs up to MONOLITHIC bytes
        go in one PUT; larger ones in CHUNK-sized PATCHes, and a failed chunk resumes where the registry
        says the upload stands."""
        if self.has_blob(digest):
            return False
        if size > MONOLITHIC and isinstance(content, Path):
            self._push_chunked(digest, size, content)
            return True

        def upload() -> None:
            start = self.request("POST", "blobs/uploads/", ok=(202,), what="blob upload start")
            url = self._location(start, self._url("blobs/uploads/"))
            url += ("&" if "?" in url else "?") + f"digest={digest}"
            self.request("PUT", url, ok=(201,), body=content, what=f"blob {digest[:19]} ({size} bytes)",
                         headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        self.attempt(f"uploading blob {digest[:19]} ({size} bytes)", upload)
        return True

    def _push_chunked(self, digest: str, size: int, path: Path) -> None:
        state: dict[str, Any] = {"url": None, "offset": 0}

        def resume_point() -> None:
            """After a failure: where the registry's upload session stands, or a new session."""
            if state["url"] is not None:
                resp = self.request("GET", state["url"], ok=(204, 404), what="blob upload status")
                match = re.match(r"^0-(\d+)$", resp.headers.get("Range", ""))
                if resp.status_code == 204 and match:
                    end = int(match.group(1))
                    state["offset"] = end + 1 if end else 0
                    state["url"] = self._location(resp, state["url"]) if resp.headers.get("Location") \
                        else state["url"]
                    return
            start = self.request("POST", "blobs/uploads/", ok=(202,), what="blob upload start")
            state["url"], state["offset"] = self._location(start, self._url("blobs/uploads/")), 0

        def upload() -> None:
            resume_point()
            with open(path, "rb") as f:
                while state["offset"] < size:
                    f.seek(state["offset"])
                    chunk = f.read(min(CHUNK, size - state["offset"]))
                    if not chunk:
                        raise RegistryError(f"{path}: shorter than the {size} bytes it had when the push began")
                    end = state["offset"] + len(chunk) - 1
                    resp = self.request("PATCH", state["url"], ok=(202,), body=chunk,
                                        what=f"blob {digest[:19]} bytes {state['offset']}-{end}",
                                        headers={"Content-Type": "application/octet-stream",
                                                 "Content-Range": f"{state['offset']}-{end}"})
                    state["url"] = self._location(resp, state["url"])
                    state["offset"] = end + 1
            url = state["url"] + ("&" if "?" in state["url"] else "?") + f"digest={digest}"
            self.request("PUT", url, ok=(201,), body=b"", what=f"blob {digest[:19]} ({size} bytes)",
                         headers={"Content-Type": "application/octet-stream"})
        self.attempt(f"uploading blob {digest[:19]} ({size} bytes)", upload)

    def fetch_blob(self, digest: str, dest: Path, size: int | None = None) -> None:
        """Download a blob to `dest`, checking its digest (and size, when known) while writing."""
        if not _DIGEST.fullmatch(digest):
            raise RegistryError(f"registry {self.repo.host}: {digest[:80]!r} is not a sha256 digest")

        def get() -> None:
            resp = self.request("GET", f"blobs/{digest}", ok=(200, 404), stream=True, what=f"blob {digest[:19]}")
            if resp.status_code == 404:
                resp.close()
                raise RegistryError(f"registry {self.repo.host}: {self.repo.name} has no blob {digest}")
            hasher = hashlib.sha256()
            written = 0
            try:
                with open(dest, "wb") as f:
                    for chunk in resp.iter_content(1 << 20):
                        written += len(chunk)
                        if size is not None and written > size:
                            resp.close()
                            raise RegistryError(f"registry {self.repo.host}: blob {digest[:19]} is larger than the "
                                                f"{size} bytes its manifest says", "nothing was placed")
                        hasher.update(chunk)
                        f.write(chunk)
            except requests.RequestException as exc:
                raise Transient(f"download cut off: {type(exc).__name__}") from None
            if f"sha256:{hasher.hexdigest()}" != digest:
                raise RegistryError(f"registry {self.repo.host}: blob {digest} arrived with another digest",
                                    "the registry or something between us altered it; nothing was placed")
        try:
            self.attempt(f"downloading blob {digest[:19]}", get)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise


def check_manifest(data: bytes, header_type: str, announced: str, ref: str, where: str) -> str:
    """The media type of a manifest the registry sent, after checking it is one; else RegistryError."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: the reply is not a JSON object", "the registry sent something else")
    inner = doc.get("mediaType")
    media_type = header_type if header_type in MANIFEST_TYPES else inner
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{where}: media type {str(header_type or inner)[:80]!r} is not a manifest",
                            "expected one of " + ", ".join(MANIFEST_TYPES))
    if inner is not None and inner != media_type:
        raise RegistryError(f"{where}: sent as {media_type} but says it is {str(inner)[:80]!r}")
    actual = sha256_digest(data)
    if _DIGEST.fullmatch(ref) and actual != ref:
        raise RegistryError(f"{where}: the registry sent a manifest whose digest is {actual}",
                            "asked by digest, the bytes must match it; the registry is broken or tampered with")
    if announced and announced != actual:
        raise RegistryError(f"{where}: the registry announced digest {announced[:80]} for bytes whose digest is "
                            f"{actual}", "the registry is broken or tampered with")
    return str(media_type)


def _error_text(resp: requests.Response) -> str:
    try:
        errors: Any = json.loads(read_capped(resp, 64 << 10, "error reply")).get("errors") or []
        return "; ".join(f"{e.get('code')}: {str(e.get('message'))[:200]}" for e in errors)[:400] or resp.reason
    except (ValueError, AttributeError, TypeError, RegistryError, Transient):
        return resp.reason or ""
