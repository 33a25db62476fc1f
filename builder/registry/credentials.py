"""Registry credentials from the standard places: containers auth.json, docker config.json and the
credential helpers they name (`credHelpers` per host, `credsStore` for all), as podman and docker read them.

A secret is held in memory only: it never reaches an argv, a log line or an error message. A helper gets
the server's name on stdin and answers JSON on stdout, as docker's helper protocol says.
"""

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from builder.core.errors import CommandError, EngineError, RegistryError
from builder.core.run import run

HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # docker-credential-NAME, found on PATH
IDENTITY_TOKEN_USER = "<token>"  # a helper's answer that carries an OAuth2 refresh token, not a password


class Credentials(NamedTuple):
    user: str
    secret: str
    source: str  # where they came from, for messages: a file, or a helper and the file that named it


def auth_files() -> list[Path]:
    """The standard credential files, in the order podman and docker read them."""
    env = os.environ
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    files.append(Path(env["XDG_RUNTIME_DIR"], "containers", "auth.json") if env.get("XDG_RUNTIME_DIR")
                 else Path(f"/run/containers/{os.getuid()}", "auth.json"))
    config = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    files.append(config / "containers" / "auth.json")
    docker = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    files.append(docker / "config.json")
    return files


def keys_for(host: str, name: str) -> Iterator[str]:
    """Most specific first: host/ns/repo, host/ns, host, then docker's URL spellings of the host."""
    parts = name.split("/")
    for i in range(len(parts), 0, -1):
        yield f"{host}/{'/'.join(parts[:i])}"
    yield host
    yield f"https://{host}"
    yield f"http://{host}"


def helper_server(host: str) -> str:
    """The server name docker hands its helpers (Docker Hub's is historical)."""
    return "https://index.docker.io/v1/" if host == "docker.io" else host


def run_helper(name: str, host: str, where: Path) -> Credentials | None:
    """`docker-credential-NAME get` for the host; None when the helper has nothing for it."""
    if not HELPER_NAME.match(name):
        raise RegistryError(f"{where}: credential helper {name!r} is not a plain name",
                            "name the helper as docker does (docker-credential-NAME on PATH): letters, digits, . _ -")
    try:
        proc = run([f"docker-credential-{name}", "get"], input=helper_server(host), check=False, timeout=60)
    except EngineError:
        raise RegistryError(f"{where}: credential helper docker-credential-{name} is not installed",
                            "install it or remove it from the file") from None
    except CommandError:
        raise RegistryError(f"credential helper docker-credential-{name} did not answer within 60 s") from None
    if proc.returncode != 0:
        if "not found" in (proc.stdout + proc.stderr).lower():  # the helpers' wording for "no entry"
            return None
        raise RegistryError(f"credential helper docker-credential-{name} failed (exit code {proc.returncode}) "
                            f"for {host}", f"run `docker-credential-{name} get` by hand to see why")
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"credential helper docker-credential-{name} answered something other than "
                            "{Username, Secret} JSON") from None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        raise RegistryError(f"credential helper docker-credential-{name}: Username and Secret must be strings")
    return Credentials(user, secret, f"docker-credential-{name} (named in {where})")


def _from_file(path: Path, data: object, host: str, name: str) -> Credentials | None:
    if not isinstance(data, dict):
        return None
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict) and isinstance(helpers.get(host), str):
        return run_helper(helpers[host], host, path)
    auths = data.get("auths")
    if isinstance(auths, dict):
        for key in keys_for(host, name):
            entry = auths.get(key) or auths.get(key + "/v1/") or auths.get(key + "/v2/")
            if isinstance(entry, dict) and entry.get("auth"):
                try:
                    user, _, secret = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
                except ValueError:
                    raise RegistryError(f"{path}: auths.{key}.auth is not base64 of USER:SECRET",
                                        "log in again to rewrite it") from None
                return Credentials(user, secret, str(path))
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        return run_helper(store, host, path)
    return None


def find_credentials(host: str, name: str) -> Credentials | None:
    """Credentials for HOST/NAME from the first standard file that has an entry or a helper for it."""
    for path in auth_files():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path}: cannot read credentials: {exc}", "fix or remove the file") from None
        found = _from_file(path, data, host, name)
        if found is not None:
            return found
    return None
