"""`builder pin`: fill a recipe's placeholder pins (all zeros) with values read from their sources.

A placeholder stands where the people who wrote the recipe could not reach the source (a vendor registry or
download site), and `builder build` refuses it. Where the source is reachable, this reads each value: an
image's manifest digest from its registry, a signing key's or a .deb's sha256 from its download. Only the
placeholder text in the recipe changes (comments and layout stay), and nothing is written unless every
value was read.
"""

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import requests

from builder.errors import BuilderError, RecipeError
from builder.models import PLACEHOLDER_SHA256, ImageBase, Recipe
from builder.recipes import display_path, load_recipe
from builder.registry import RegistryClient, parse_reference

DOWNLOAD_TIMEOUT = (10, 300)  # connect, read


@dataclass(frozen=True)
class Placeholder:
    field: str  # e.g. variants.rocm.base.toolchain.repositories[0].key_sha256
    source: str  # the image reference without its digest, or the file's URL
    image: bool


def placeholders(recipe: Recipe, variant: str | None = None) -> list[Placeholder]:
    """Every placeholder pin of the recipe (or of one variant), each source once."""
    found: dict[str, Placeholder] = {}
    for name, spec in recipe.variants.items():
        if variant is not None and name != variant:
            continue
        for stage in ("toolchain", "runtime"):
            base = getattr(spec.base, stage)
            if not isinstance(base, ImageBase):
                continue
            where = f"variants.{name}.base.{stage}"
            if base.ref.endswith(PLACEHOLDER_SHA256):
                ref = base.ref.rsplit("@", 1)[0]
                found.setdefault(ref, Placeholder(f"{where}.ref", ref, True))
            for i, repo in enumerate(base.repositories):
                if repo.key_sha256 == PLACEHOLDER_SHA256:
                    found.setdefault(repo.key_url, Placeholder(f"{where}.repositories[{i}].key_sha256",
                                                               repo.key_url, False))
            for i, deb in enumerate(base.debs):
                if deb.sha256 == PLACEHOLDER_SHA256:
                    found.setdefault(deb.url, Placeholder(f"{where}.debs[{i}].sha256", deb.url, False))
    return list(found.values())


def image_digest(ref: str) -> str:
    """The digest the registry serves for NAME:TAG (for a multi-platform image, its index)."""
    repo, tag = parse_reference(ref)
    digest = RegistryClient(repo).manifest_digest(tag)
    if digest is None:
        raise RecipeError(f"{ref}: the registry has no such tag", "check the tag in the recipe")
    return digest.removeprefix("sha256:")


def file_sha256(url: str) -> str:
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT) as resp:
            if resp.status_code != 200:
                raise BuilderError(f"could not download {url}: the server answered {resp.status_code}",
                                   "check the URL in the recipe")
            for chunk in resp.iter_content(1 << 20):
                digest.update(chunk)
    except requests.RequestException as exc:
        raise BuilderError(f"could not download {url}: {type(exc).__name__}",
                           "run `builder pin` where that site is reachable") from None
    return digest.hexdigest()


def read_value(pin: Placeholder) -> str:
    return image_digest(pin.source) if pin.image else file_sha256(pin.source)


def rewrite(text: str, values: dict[Placeholder, str]) -> str:
    """The recipe text with each placeholder replaced: the image reference's digest, or the first
    all-zeros sha256 after the (uncommented) line that names the file's URL."""
    for pin, value in values.items():
        if pin.image:
            old = f"{pin.source}@sha256:{PLACEHOLDER_SHA256}"
            if old not in text:
                raise RecipeError(f"{pin.field}: cannot find {old} in the recipe text", "edit the recipe by hand")
            text = text.replace(old, f"{pin.source}@sha256:{value}")
            continue
        line = re.search(rf"^[^#\n]*{re.escape(pin.source)}", text, re.MULTILINE)
        zeros = text.find(PLACEHOLDER_SHA256, line.end()) if line else -1
        if zeros < 0:
            raise RecipeError(f"{pin.field}: cannot find its placeholder after {pin.source} in the recipe text",
                              "edit the recipe by hand")
        text = text[:zeros] + value + text[zeros + len(PLACEHOLDER_SHA256):]
    return text


def pin_recipe(path: Path, variant: str | None = None, dry_run: bool = False) -> dict[Placeholder, str]:
    """Read every placeholder's value; unless dry_run, write them into the recipe in one rename."""
    where = display_path(path)
    recipe = load_recipe(path)
    if variant is not None and variant not in recipe.variants:
        raise RecipeError(f"{where}: variants: no {variant!r} section", f"variants: {', '.join(recipe.variants)}")
    pins = placeholders(recipe, variant)
    values = {pin: read_value(pin) for pin in pins}
    if not values or dry_run:
        return values
    text = rewrite(path.read_text(), values)
    tmp = path.with_name(f".{path.name}.pin-tmp")
    tmp.write_text(text)
    try:
        left = {p.source for p in placeholders(load_recipe(tmp), variant)} & {p.source for p in values}
        if left:
            raise RecipeError(f"{where}: the rewritten recipe still holds placeholders for {', '.join(sorted(left))}",
                              "edit the recipe by hand")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return values
