"""`builder fetch`: an image's network-bound inputs land in the cache, checked, and nothing is built."""

import json

from builder.core.paths import cache_subdir
from builder.fetch.debstore import DebStore
from builder.flavours.prepare import prepare
from builder.plan.bases import bootstrap_key, locked_for
from builder.recipe.load import recipe_path_for
from builder.recipe.models import BootstrapBase
from conftest import run_cli


def test_fetch_leaves_every_locked_package_of_the_image_in_the_cache() -> None:
    """What a later build needs from the network is there: for each bootstrapped base of the cpu image, its
    rootfs is cached already or every locked .deb is in the store with the lock's sha256 (the store checks)."""
    proc = run_cli("fetch", "--target", "cpu", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["image"] == "cpu/cpu" and doc["netboot_kernel"] is None
    prep = prepare(recipe_path_for("cpu"))
    store = DebStore(cache_subdir("debs"))
    bases = [b for b in prep.flavour.bases(prep) if isinstance(b, BootstrapBase)]
    assert bases
    for base in bases:
        entry = locked_for(base, prep.locked)
        assert entry is not None, base.suite
        tarball = cache_subdir("bases") / f"{base.suite}-{bootstrap_key(base, entry)[:16]}.tar"
        assert tarball.is_file() or all(store.has(deb) for deb in entry.resolved), base.suite


def test_fetch_of_an_unknown_target_is_one_line() -> None:
    proc = run_cli("fetch", "--target", "strix-hallo")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "strix-hallo" in proc.stderr
