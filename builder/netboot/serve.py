"""The control node's side: an HTTP server for pxe-root/, and dnsmasq's proxy-DHCP + TFTP configuration."""

import posixpath
import re
import shutil
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from builder.core.errors import CommandError, EngineError, RecipeError
from builder.core.run import run
from builder.netboot.inventory import Control

SERVED = ("/current/", "/pins/", "/blobs/sha256/", "/tftp/")
# Of the current generation, only what iPXE fetches: the boot script and each node's script. The generation
# also keeps the cluster file, nodes.json and the manifests for builder on the control node; the boot network
# (anyone on it can ask) gets none of them.
_CURRENT = re.compile(r"/current/(boot\.ipxe|nodes/[0-9a-f]{2}(-[0-9a-f]{2}){5}\.ipxe)")
# a pinned node's script (builder/netboot/publish.py: pins)
_PINS = re.compile(r"/pins/[0-9a-f]{2}(-[0-9a-f]{2}){5}\.ipxe")


def served_file(root: Path, request_path: str) -> Path | None:
    """The file a request may read, or None: the path is decoded and normalised first, then checked
    against the served folders, and what it resolves to (symlinks followed) must stay inside the root."""
    path = unquote(urlsplit(request_path).path)
    if "\0" in path or "\\" in path or path.endswith("/"):
        return None
    normal = posixpath.normpath(path)
    if not normal.startswith(SERVED) or normal != path:
        return None
    if normal.startswith("/current/") and not _CURRENT.fullmatch(normal):
        return None
    if normal.startswith("/pins/") and not _PINS.fullmatch(normal):
        return None
    base = root.resolve()
    try:
        resolved = (base / normal.lstrip("/")).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not resolved.is_relative_to(base) or not resolved.is_file():
        return None
    return resolved


class _Handler(SimpleHTTPRequestHandler):
    """Files under current/, blobs/ and tftp/ only; no listings. `current` is resolved on every request."""

    root: Path

    def send_head(self) -> Any:
        if served_file(self.root, self.path) is None:
            self.send_error(404, "not a boot file")
            return None
        return super().send_head()

    def copyfile(self, source: Any, outputfile: Any) -> None:
        # One line per response with the bytes actually sent: how much a boot fetched is read from this log.
        sent = 0
        try:
            while chunk := source.read(1 << 16):
                outputfile.write(chunk)
                sent += len(chunk)
        finally:
            self.log_message("sent %d bytes of %s", sent, self.path)

    def list_directory(self, path: Any) -> Any:
        self.send_error(404, "no listings")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        sys.stdout.write(f"pxe-http: {self.client_address[0]} {format % args}\n")
        sys.stdout.flush()


def http_server(root: Path, bind: str, port: int) -> ThreadingHTTPServer:
    if not (root / "current").exists():
        raise RecipeError(f"{root} has no current generation", "run `builder pxe publish cluster.yaml`")
    try:
        handler = type("Handler", (_Handler,), {"root": root})
        server = ThreadingHTTPServer((bind, port), partial(handler, directory=str(root)))
    except OSError as exc:
        raise EngineError(f"cannot listen on {bind}:{port}: {exc.strerror}",
                          "pick another --port, or --bind an address of this machine") from None
    server.daemon_threads = True
    return server


def dnsmasq_config(root: Path, control: Control) -> str:
    """Proxy-DHCP (beside the site's DHCP server) + TFTP of iPXE, then HTTP for iPXE itself.

    Plain PXE ROMs get undionly.kpxe (BIOS) or ipxe.efi (UEFI) over TFTP; iPXE, recognised by its user
    class, is sent straight to boot.ipxe over HTTP, which chains the node's own script by MAC.
    """
    if not control.subnet:
        raise RecipeError("cluster.yaml: control.subnet: needed for proxy-DHCP (the nodes' network, e.g. 192.168.50.0)")
    url = f"http://{control.address}:{control.http_port}/current/boot.ipxe"
    lines = [
        "# written by `builder pxe serve`; proxy-DHCP only: addresses still come from the site's DHCP server",
        "port=0",
        "log-dhcp",
        *([f"interface={control.interface}", "bind-interfaces"] if control.interface else []),
        f"dhcp-range={control.subnet},proxy",
        "enable-tftp",
        f"tftp-root={(root / 'tftp').resolve()}",
        "dhcp-userclass=set:ipxe,iPXE",
        'pxe-prompt="builder netboot",0',
        'pxe-service=tag:!ipxe,x86PC,"iPXE (BIOS)",undionly.kpxe',
        'pxe-service=tag:!ipxe,BC_EFI,"iPXE (UEFI)",ipxe.efi',
        'pxe-service=tag:!ipxe,X86-64_EFI,"iPXE (UEFI)",ipxe.efi',
        f'pxe-service=tag:ipxe,x86PC,"builder",{url}',
        f'pxe-service=tag:ipxe,BC_EFI,"builder",{url}',
        f'pxe-service=tag:ipxe,X86-64_EFI,"builder",{url}',
    ]
    return "\n".join(lines) + "\n"


def check_dnsmasq(config: Path) -> None:
    """dnsmasq's own syntax check of the file (starts nothing)."""
    if not shutil.which("dnsmasq"):
        raise EngineError("dnsmasq is not installed", "apt-get install dnsmasq-base")
    try:
        run(["dnsmasq", "--test", f"--conf-file={config}"], timeout=60)
    except CommandError as exc:
        raise EngineError(f"dnsmasq rejects {config}: {exc.last_line}") from None
