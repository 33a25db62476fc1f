"""What a board needs on its kernel command line, derived from the facts a cluster file states about it.

Strix Halo (the strix-halo target) shares its RAM between the CPU and the gfx1151 iGPU. The kernel lets the
iGPU map only part of it unless told otherwise: `amdgpu.gttsize` (MiB) and `ttm.pages_limit` (4 KiB pages)
raise that limit, and the two must describe the same size. builder derives both from the node's `ram:`,
leaving OS_RESERVE to the operating system (the field's 128 GB boards run with 124 GiB mapped:
amdgpu.gttsize=126976 ttm.pages_limit=32505856), and adds `iommu=pt` (the IOMMU in pass-through mode; the
field's other choice, amd_iommu=off, also switches off the NPU). Any of them set in the node's or the file's
kernel_args wins over builder's.
"""

from dataclasses import dataclass

from builder.core.errors import RecipeError

GIB = 1 << 30
MIB = 1 << 20
PAGE = 4096
OS_RESERVE = 4 * GIB  # what the operating system keeps of a Strix Halo board's RAM
GTT = "amdgpu.gttsize"
TTM = "ttm.pages_limit"


@dataclass(frozen=True)
class BoardArgs:
    """The kernel words builder adds for a node, and what its accelerator can then use (None: no limit)."""

    words: tuple[str, ...]
    gpu_memory: int | None


def _value(words: list[str], name: str) -> str | None:
    found = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
    return found[-1] if found else None


def board_args(target: str, ram: int | None, given: list[str], where: str) -> BoardArgs:
    """The words for a node of `target` with `ram` bytes, given the kernel words the file already sets for it
    (`given`: the file's, then the node's). `where` names the node's fields in errors."""
    if target != "strix-halo":
        return BoardArgs((), None)
    gtt, ttm = _value(given, GTT), _value(given, TTM)
    iommu = () if _value(given, "iommu") or _value(given, "amd_iommu") else ("iommu=pt",)
    if (gtt is None) != (ttm is None):
        raise RecipeError(f"{where}.kernel_args: {GTT if gtt else TTM} is set without {TTM if gtt else GTT}: the two "
                          "must describe the same size (MiB and 4 KiB pages)",
                          "set both, or neither and give the node's ram: so that builder derives them")
    if gtt is not None and ttm is not None:
        if not (gtt.isdigit() and ttm.isdigit()) or int(gtt) * MIB != int(ttm) * PAGE:
            raise RecipeError(f"{where}.kernel_args: {GTT}={gtt} MiB and {TTM}={ttm} pages describe different "
                              "sizes", f"{TTM} must be {GTT} × 256 (e.g. {GTT}=126976 {TTM}=32505856)")
        return BoardArgs(iommu, int(gtt) * MIB)
    if ram is None:
        raise RecipeError(f"{where}.ram: a Strix Halo board's iGPU maps only part of its memory unless the kernel "
                          "is told how much, and builder derives that from the board's RAM",
                          "ram: 128GiB (or 64GiB, 32GiB: what the board has)")
    mapped = ram - OS_RESERVE
    return BoardArgs((f"{GTT}={mapped // MIB}", f"{TTM}={mapped // PAGE}", *iommu), mapped)


def check_ram(ram: int, target: str, where: str) -> None:
    """A board's RAM is a whole number of GiB (what boards are sold with), and leaves room for the system."""
    if ram % GIB:
        raise RecipeError(f"{where}.ram: {ram} bytes is {ram / GIB:.1f} GiB; a board's RAM is a whole number of GiB "
                          "(128GB is read as 128 × 10⁹ bytes)", "write it in GiB, e.g. ram: 128GiB")
    if target == "strix-halo" and ram <= OS_RESERVE:
        raise RecipeError(f"{where}.ram: {ram // GIB} GiB leaves nothing for the iGPU after the system's "
                          f"{OS_RESERVE // GIB} GiB", "Strix Halo boards ship with 32, 64 or 128 GiB")
