"""The registry client against a real token service (docker-registry's `auth: token`, JWTs signed here),
credential helpers, a TLS registry with a test CA, a CONNECT proxy, and resumable chunked uploads.
No engine: netboot sets are pushed and pulled through the CLI (or the client, where timing matters)."""

import base64
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from registry import Proxy, Registry, start_registry
from test_artifacts import netboot_set

import builder.registry.client as registry_module
from builder.core.digests import sha256_digest
from builder.publish.artifacts import NETBOOT_FILES
from builder.registry.client import RegistryClient, Repository
from conftest import require_tool, run_cli_inproc
from servers import ConnectProxy, Reply, TokenService, make_ca

USER, PASSWORD = "token-user", "t0ken-Pa55"


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No credentials, proxies or CA settings from the machine: each test sets what it means."""
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"), "DOCKER_CONFIG": str(tmp_path / "docker"),
           "XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "BUILDER_CACHE": str(tmp_path / "cache")}
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def login(env: dict[str, str], host: str, user: str, password: str) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    Path(env["REGISTRY_AUTH_FILE"]).write_text(json.dumps({"auths": {host: {"auth": token}}}))


@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[TokenService]:
    require_tool("openssl", "openssl")
    service = TokenService(tmp_path / "token", USER, PASSWORD)
    yield service
    service.close()


@pytest.fixture
def token_registry(tmp_path: Path, tokens: TokenService) -> Iterator[Registry]:
    with start_registry(tmp_path / "registry", token_auth=tokens.registry_auth()) as reg:
        yield reg


def push_and_pull(host: str, tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    folder = netboot_set(tmp_path / "nb", seed=11)
    pushed = run_cli_inproc("pxe", "push", "--dir", str(folder), "--registry", f"{host}/netboot", env=env)
    if pushed.returncode != 0:
        return pushed.returncode, pushed.stderr
    pulled = run_cli_inproc("pxe", "pull", f"{host}/netboot:netboot-cpu-cpu", "--dest", str(tmp_path / "dest"), env=env)
    if pulled.returncode == 0:
        for name in NETBOOT_FILES:
            assert (tmp_path / "dest" / "cpu-cpu" / name).read_bytes() == (folder / name).read_bytes()
    return pulled.returncode, pulled.stderr


# --- Bearer tokens -------------------------------------------------------------------------------------

def test_bearer_token_push_and_pull_through_a_real_token_service(token_registry: Registry, tokens: TokenService,
                                                                   isolated: dict[str, str], tmp_path: Path) -> None:
    login(isolated, token_registry.host, USER, PASSWORD)
    code, err = push_and_pull(token_registry.host, tmp_path, isolated)
    assert code == 0, err
    # Push asked for pull,push on the repository; the pull afterwards for pull only.
    scopes = [a["actions"] for claims in tokens.issued for a in claims["access"]]
    assert ["pull", "push"] in scopes and ["pull"] in scopes
    assert PASSWORD not in err


def test_wrong_password_at_the_token_service_is_one_line_and_pushes_nothing(
        token_registry: Registry, isolated: dict[str, str], tmp_path: Path) -> None:
    login(isolated, token_registry.host, USER, "wrong-password")
    folder = netboot_set(tmp_path / "nb", seed=12)
    proc = run_cli_inproc("pxe", "push", "--dir", str(folder), "--registry", f"{token_registry.host}/netboot",
                          env=isolated)
    assert proc.returncode == 1
    assert f"refused the credentials for user {USER!r}" in proc.stderr and "Traceback" not in proc.stderr
    assert "wrong-password" not in proc.stdout + proc.stderr
    assert not (token_registry.root / "storage" / "docker" / "registry" / "v2" / "repositories").exists()


def test_an_expired_token_is_replaced_after_the_registry_refuses_it(token_registry: Registry,
                                                                     tokens: TokenService,
                                                                     isolated: dict[str, str]) -> None:
    # The registry allows 60 s of clock skew: these JWTs are accepted for about 3 s, while the token
    # service claims an hour, so only the 401 can tell the client that its token ran out.
    tokens.lifetime, tokens.expires_in = -57, 3600
    login(isolated, token_registry.host, USER, PASSWORD)
    client = RegistryClient(Repository.parse(f"{token_registry.host}/x"), push=True)
    data = b"first blob"
    assert client.push_blob(sha256_digest(data), len(data), data) is True
    assert len(tokens.issued) == 1
    time.sleep(5)
    later = b"second blob, after the token ran out"
    assert client.push_blob(sha256_digest(later), len(later), later) is True
    assert len(tokens.issued) == 2
    assert client.has_blob(sha256_digest(later))


def test_a_token_is_renewed_before_it_runs_out(token_registry: Registry, tokens: TokenService,
                                               isolated: dict[str, str]) -> None:
    # The JWT stays valid, but the service says 2 s: the client must ask again on its own.
    tokens.expires_in = 2
    login(isolated, token_registry.host, USER, PASSWORD)
    client = RegistryClient(Repository.parse(f"{token_registry.host}/x"))
    assert client.manifest_digest("latest") is None
    assert len(tokens.issued) == 1
    time.sleep(2.5)
    assert client.manifest_digest("latest") is None
    assert len(tokens.issued) == 2


def test_identity_token_from_a_credential_helper_is_exchanged_with_an_oauth2_post(
        token_registry: Registry, tokens: TokenService, isolated: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokens.identity_token = "refresh-me-0123"
    helper_on_path(tmp_path, monkeypatch, "oauth", {token_registry.host: ("<token>", "refresh-me-0123")})
    docker_config(isolated, {"credHelpers": {token_registry.host: "oauth"}})
    client = RegistryClient(Repository.parse(f"{token_registry.host}/x"), push=True)
    data = b"pushed with an identity token"
    assert client.push_blob(sha256_digest(data), len(data), data) is True
    assert tokens.issued and tokens.crafted.seen[-1].method == "POST"


@pytest.mark.parametrize(("reply", "message"), [
    (Reply(200, {"Content-Type": "text/html"}, b"<html>login page</html>"), "not a JSON object"),
    (Reply(200, {}, b'["token"]'), "not a JSON object"),
    (Reply(200, {}, b'{"expires_in": 300}'), "without a usable token"),
    (Reply(200, {}, b'{"token": "abc\\r\\nX-Injected: 1"}'), "without a usable token"),
    (Reply(200, {}, b'{"token": 12345}'), "without a usable token"),
    (Reply(200, {}, b'{"token": "' + b"a" * (2 << 20) + b'"}'), "more than the 1 MiB allowed"),
    (Reply(200, {}, b'{"token": "abc', cut_at=5), "cut off"),
    (Reply(502, {}, b"bad gateway"), "failed after 3 attempts"),
], ids=["html", "json-array", "no-token", "header-injection", "token-not-a-string", "huge", "truncated", "502"])
def test_garbage_from_the_token_service_is_one_line_and_pulls_nothing(
        token_registry: Registry, tokens: TokenService, isolated: dict[str, str], tmp_path: Path,
        reply: Reply, message: str) -> None:
    login(isolated, token_registry.host, USER, PASSWORD)
    tokens.reply = lambda seen: reply
    dest = tmp_path / "dest"
    proc = run_cli_inproc("pxe", "pull", f"{token_registry.host}/netboot:netboot-cpu-cpu", "--dest", str(dest),
                          env=isolated)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # the error and its hint
    assert not dest.exists() or not any(dest.rglob("*"))


# --- credential helpers --------------------------------------------------------------------------------

def helper_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                   entries: dict[str, tuple[str, str]]) -> Path:
    """docker-credential-NAME: answers `get` for the hosts in `entries` as docker's helpers do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    table = {host: {"ServerURL": host, "Username": user, "Secret": secret} for host, (user, secret) in entries.items()}
    (bin_dir / f"{name}.json").write_text(json.dumps(table))
    script.write_text("#!/bin/sh\n"
                      "[ \"$1\" = get ] || exit 2\n"
                      "read -r server\n"
                      f"python3 - \"$server\" {bin_dir / (name + '.json')} <<'EOF'\n"
                      "import json, sys\n"
                      "entry = json.load(open(sys.argv[2])).get(sys.argv[1])\n"
                      "print(json.dumps(entry)) if entry else print('credentials not found in native keychain')\n"
                      "sys.exit(0 if entry else 1)\n"
                      "EOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return script


def docker_config(env: dict[str, str], config: dict[str, object]) -> None:
    Path(env["DOCKER_CONFIG"]).mkdir(parents=True, exist_ok=True)
    (Path(env["DOCKER_CONFIG"]) / "config.json").write_text(json.dumps(config))


def test_credentials_from_a_cred_helpers_entry(token_registry: Registry, isolated: dict[str, str],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper_on_path(tmp_path, monkeypatch, "testpass", {token_registry.host: (USER, PASSWORD)})
    docker_config(isolated, {"credHelpers": {token_registry.host: "testpass"}})
    code, err = push_and_pull(token_registry.host, tmp_path, {**isolated, "PATH": os.environ["PATH"]})
    assert code == 0, err


def test_credentials_from_a_creds_store_and_a_store_without_an_entry(
        token_registry: Registry, isolated: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    helper_on_path(tmp_path, monkeypatch, "store", {token_registry.host: (USER, PASSWORD)})
    docker_config(isolated, {"credsStore": "store"})
    client = RegistryClient(Repository.parse(f"{token_registry.host}/x"), push=True)
    assert client.push_blob(sha256_digest(b"via the store"), 13, b"via the store") is True

    helper_on_path(tmp_path, monkeypatch, "store", {})  # the store has nothing for this registry
    env = {**isolated, "PATH": os.environ["PATH"]}
    proc = run_cli_inproc("pxe", "push", "--dir", str(netboot_set(tmp_path / "nb", seed=13)), "--registry",
                          f"{token_registry.host}/netboot", env=env)
    assert proc.returncode == 1 and "no credentials were found" in proc.stderr and "Traceback" not in proc.stderr


def test_a_helper_named_like_a_path_is_refused(token_registry: Registry, isolated: dict[str, str],
                                               tmp_path: Path) -> None:
    docker_config(isolated, {"credHelpers": {token_registry.host: "../../tmp/evil"}})
    proc = run_cli_inproc("pxe", "pull", f"{token_registry.host}/netboot:x", "--dest", str(tmp_path / "d"),
                          env=isolated)
    assert proc.returncode == 1
    assert "credential helper '../../tmp/evil' is not a plain name" in proc.stderr and "Traceback" not in proc.stderr


# --- TLS, CA bundles and proxies -----------------------------------------------------------------------

@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[tuple[Registry, Path]]:
    require_tool("openssl", "openssl")
    ca = make_ca(tmp_path / "ca")
    with start_registry(tmp_path / "tls-registry", tls=(ca.cert, ca.key, ca.ca)) as reg:
        yield reg, ca.ca


def test_tls_registry_trusted_through_certs_d(tls_registry: tuple[Registry, Path], isolated: dict[str, str],
                                              tmp_path: Path) -> None:
    registry, ca = tls_registry
    untrusted = run_cli_inproc("pxe", "pull", f"{registry.host}/netboot:x", "--dest", str(tmp_path / "d"), env=isolated)
    # A loopback registry is spoken to over http unless certs.d names it: an https-only one then refuses.
    assert untrusted.returncode == 1 and "Traceback" not in untrusted.stderr
    certs = Path(isolated["XDG_CONFIG_HOME"]) / "containers" / "certs.d" / registry.host
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_bytes(ca.read_bytes())
    code, err = push_and_pull(registry.host, tmp_path, isolated)
    assert code == 0, err


def test_https_through_a_connect_proxy_with_a_ca_bundle(tls_registry: tuple[Registry, Path],
                                                        isolated: dict[str, str], tmp_path: Path) -> None:
    registry, ca = tls_registry
    proxy = ConnectProxy({"registry.test:443": registry.host})
    try:
        env = {**isolated, "HTTPS_PROXY": proxy.url}
        no_ca = run_cli_inproc("pxe", "pull", "registry.test/netboot:x", "--dest", str(tmp_path / "d"), env=env)
        assert no_ca.returncode == 1 and "TLS certificate is not trusted" in no_ca.stderr
        assert "SSL_CERT_FILE" in no_ca.stderr and "Traceback" not in no_ca.stderr
        code, err = push_and_pull("registry.test", tmp_path, {**env, "SSL_CERT_FILE": str(ca)})
        assert code == 0, err
        assert proxy.seen and all(line == "CONNECT registry.test:443" for line in proxy.seen)
    finally:
        proxy.close()


def test_no_proxy_reaches_a_local_registry_directly(tmp_path: Path, isolated: dict[str, str]) -> None:
    with start_registry(tmp_path / "registry") as registry:
        dead = "http://127.0.0.1:9"  # discard port: nothing listens
        env = {**isolated, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
        through_dead = run_cli_inproc("pxe", "pull", f"{registry.host}/netboot:x", "--dest", str(tmp_path / "d"),
                                      env=env)
        assert through_dead.returncode == 1 and "ProxyError" in through_dead.stderr
        assert "Traceback" not in through_dead.stderr
        missing = run_cli_inproc("pxe", "pull", f"{registry.host}/netboot:x", "--dest", str(tmp_path / "d"),
                                 env={**env, "NO_PROXY": "127.0.0.1,localhost"})
        assert missing.returncode == 1 and "has no manifest 'x'" in missing.stderr


# --- chunked, resumable uploads ------------------------------------------------------------------------

def test_a_large_blob_goes_in_chunks_and_resumes_after_a_cut(tmp_path: Path, isolated: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "MONOLITHIC", 1 << 20)
    monkeypatch.setattr(registry_module, "CHUNK", 1 << 20)
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom((5 << 20) + 12345))  # 6 chunks, the last one short; more than the 4 MiB JSON cap
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    patches: list[str] = []

    def cut_the_third_patch(method: str, path: str, length: int) -> str | None:
        if method == "PATCH":
            patches.append(path)
            return "cut" if len(patches) == 3 else None
        return None
    with start_registry(tmp_path / "registry") as registry:
        proxy = Proxy(registry.host, fault=cut_the_third_patch)
        try:
            client = RegistryClient(Repository.parse(f"{proxy.host}/x"), push=True)
            assert client.push_blob(digest, blob.stat().st_size, blob) is True
        finally:
            proxy.close()
        # Resumed, not restarted: one upload session, the status asked once, every chunk but the cut one sent once.
        assert [s for s in proxy.seen if s[0] == "POST"] and len([s for s in proxy.seen if s[0] == "POST"]) == 1
        assert len([s for s in proxy.seen if s[0] == "GET" and "/blobs/uploads/" in s[1]]) == 1
        assert len(patches) == 7
        # Present now: HEAD says so (its Content-Length is the blob's size, not a reply body to cap).
        direct = RegistryClient(Repository.parse(f"{registry.host}/x"), push=True)
        assert direct.has_blob(digest) and direct.push_blob(digest, blob.stat().st_size, blob) is False
        served = requests.get(registry.url(f"x/blobs/{digest}"), timeout=10).content
        assert served == blob.read_bytes()
