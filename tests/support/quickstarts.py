"""The quickstarts' runnable parts (docs/quickstarts/*.md): every ```console block, as commands and what each
shows. A line starting with `$ ` is a command (a line ending in a backslash goes on on the next line); the lines
after it are what the command prints, `…` standing for what varies: a line of its own for any number of lines,
inside a line for any text."""

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "docs" / "quickstarts"
# In the order docs/quickstarts/README.md lists them
PAGES = ("strix-halo.md", "intel-mini-pc.md", "arc-netboot.md", "nvidia.md")
ANY = "…"


@dataclass(frozen=True)
class Step:
    command: str
    shows: tuple[str, ...]


def steps(text: str) -> list[Step]:
    out: list[Step] = []
    for block in re.findall(r"^```console\n(.*?)^```$", text, re.M | re.S):
        command: list[str] = []
        shows: list[str] = []
        continued = False
        for line in block.splitlines():
            if continued:
                command.append(line)
            elif line.startswith("$ "):
                if command:
                    out.append(Step("\n".join(command), tuple(shows)))
                command, shows = [line[2:]], []
            else:
                assert command, f"output before any command in a console block: {line!r}"
                shows.append(line)
            continued = line.endswith("\\")
        if command:
            out.append(Step("\n".join(command), tuple(shows)))
    return out


def _pattern(line: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in " ".join(line.split()).split(ANY)))


def mismatch(shows: tuple[str, ...], output: str) -> str | None:
    """None when `output` is what `shows` says (whitespace runs compared as one space), else the first line
    shown that was not printed. Lines shown one after another are printed one after another; a `…` line may
    stand for any lines, and without one at either end the output starts and ends as shown."""
    actual = [" ".join(line.split()) for line in output.splitlines()]
    segments: list[list[str]] = [[]]
    for line in shows:
        if line.strip() == ANY:
            segments.append([])
        else:
            segments[-1].append(line)
    at = 0
    for i, segment in enumerate(segments):
        if not segment:
            continue
        patterns = [_pattern(line) for line in segment]
        first = i == 0
        last = i == len(segments) - 1
        starts = [at] if first else range(at, len(actual) - len(segment) + 1)
        found = next((s for s in starts if s + len(segment) <= len(actual) and
                      all(p.fullmatch(actual[s + k]) for k, p in enumerate(patterns)) and
                      (not last or s + len(segment) == len(actual))), None)
        if found is None:
            return segment[0]
        at = found + len(segment)
    return None
