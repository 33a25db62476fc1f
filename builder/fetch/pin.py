"""`builder pin`: fill a recipe's placeholder pins (all zeros) with values read from their sources.

A placeholder stands where the people who wrote the recipe could not reach the source (a vendor registry or
download site), and `builder build` refuses it. Where the source is reachable, this reads each value: an
image's manifest digest from its registry, a signing key's or a .deb's sha256 from its download. Only the
placeholder text in the recipe changes (comments and layout stay), and nothing is written unless every
value was read. Downloaded files stay in the cache under their sha256, where the build's fetch_file finds them.
"""

import hashlib
import os
import re
from pathlib import Path

from builder.core.digests import sha256_file
from builder.core.errors import RecipeError
from builder.core.paths import cache_subdir
from builder.fetch.source import download
from builder.recipe.load import display_path, load_recipe
from builder.recipe.models import PLACEHOLDER_SHA256, Placeholder, Recipe, placeholders_of
from builder.registry.client import RegistryClient, parse_reference


def placeholders(recipe: Recipe, variant: str | None = None) -> list[Placeholder]:
    """The placeholder pins of the recipe (or of one variant) that can be read from a registry or a URL,
    each source once (SDK wheels are pinned by hand)."""
    found: dict[str, Placeholder] = {}
    for name, spec in recipe.variants.items():
        if variant in (None, name):
            for pin in placeholders_of(f"variants.{name}", spec.base.toolchain, spec.base.runtime, spec.sdks):
                if pin.kind != "wheel":
                    found.setdefault(pin.source, pin)
    return list(found.values())


def image_digest(ref: str) -> str:
    """The digest the registry serves for NAME:TAG (for a multi-platform image, its index)."""
    repo, tag = parse_reference(ref)
    digest = RegistryClient(repo).manifest_digest(tag)
    if digest is None:
        raise RecipeError(f"{ref}: the registry has no such tag", "check the tag in the recipe")
    return digest.removeprefix("sha256:")


def file_sha256(url: str) -> str:
    """Download the file into the cache where the build's fetch_file looks for it, and return its sha256."""
    files = cache_subdir("sources/files")
    part = files / f"pin-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    download(url, part)
    digest = sha256_file(part)
    os.replace(part, files / digest)
    return digest


def read_value(pin: Placeholder) -> str:
    return image_digest(pin.source) if pin.kind == "image" else file_sha256(pin.source)


def rewrite(text: str, values: dict[Placeholder, str]) -> str:
    """The recipe text with each placeholder replaced: the image reference's digest, or the first
    all-zeros sha256 after the (uncommented) line that names the file's URL."""
    for pin, value in values.items():
        if pin.kind == "image":
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
