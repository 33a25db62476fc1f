"""A netbooted node's state as its agent reports it (`state`), checked, and what `builder cluster status` makes of it.

The node's agent (images/netboot/plan.sh, AGENT_PORT, admitted from the control node only) answers `state` with
one line of `KEY=VALUE` tokens, each value percent-encoded: the root, plan and firewall sha256 from its kernel
command line (`root`, `plan`, `firewall`), the image id its root was made from (`image`), the latest device check
(`device`: ready, degraded or fallback; `devices`: what llama.cpp listed; `device_why`), the qualification
(`qualify`: qualified, unqualified, failed or pending; `qualify_device`, `qualify_why`) and the last error the node
printed (`error`). What the node does not know is absent. The answer is hostile until checked: its size is
bounded, every token must have the grammar, each known key its own form (an unknown key, from a newer node, is
skipped), no key twice; free text is shown with anything but printable ASCII replaced.

Which generation a node runs is not on the node: a generation's id is the hash of its files, node scripts
included. The node reports the root, plan and firewall its kernel command line named; the generation is the one
whose boot script for that node names the same three (its pin's generation when `pxe pin` or a roll pinned it,
else the current one, else any other in pxe-root/).
"""

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from builder.cluster.ssh import ask_agent
from builder.netboot import publish

MAX_ANSWER = 4096
MAX_TEXT = 400
_TOKEN = re.compile(r"([a-z_]{1,20})=((?:[A-Za-z0-9._~:/@+,-]|%[0-9A-F]{2}){0,1300})")
_HEX = re.compile(r"[0-9a-f]{64}")
_FORMS: dict[str, re.Pattern[str] | int] = {
    "root": _HEX, "plan": _HEX, "firewall": _HEX,
    "image": re.compile(r"sha256:[0-9a-f]{64}"),
    "device": re.compile(r"ready|degraded|fallback"),
    "devices": re.compile(r"[A-Za-z0-9_]{1,32}(,[A-Za-z0-9_]{1,32}){0,15}"),
    "qualify": re.compile(r"qualified|unqualified|failed|pending"),
    "device_why": MAX_TEXT, "qualify_device": 64, "qualify_why": MAX_TEXT, "error": MAX_TEXT,
}
BOOT_WORDS = {"builder.sha256": "root", "builder.plan_sha256": "plan", "builder.firewall_sha256": "firewall"}


class BadState(ValueError):
    """The agent's answer is not a state line builder can read."""


def _text(raw: bytes) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in raw.decode("ascii", errors="replace"))


def parse(answer: str) -> dict[str, str]:
    """The agent's `state` line into its fields, each checked (BadState names the first that is not)."""
    if len(answer) > MAX_ANSWER:
        raise BadState(f"{len(answer)} characters, above {MAX_ANSWER}")
    if answer == "none":
        return {}
    out: dict[str, str] = {}
    for i, token in enumerate(answer.split(" ")):
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise BadState(f"token {i + 1} is not KEY=VALUE (percent-encoded)")
        key, value = match.group(1), unquote_to_bytes(match.group(2))
        if key in out:
            raise BadState(f"{key} given twice")
        form = _FORMS.get(key)
        if form is None:
            continue  # a newer node's field
        if isinstance(form, int):
            if not value or len(value) > form:
                raise BadState(f"{key}: {len(value)} bytes, expected 1 to {form}")
            out[key] = _text(value)
        elif not (value.isascii() and form.fullmatch(value.decode("ascii"))):
            raise BadState(f"{key}: not of the expected form")
        else:
            out[key] = value.decode("ascii")
    return out


@dataclass(frozen=True)
class Answer:
    fields: dict[str, str] | None  # None: no state (see `why`)
    why: str = ""  # why there is none: no answer, an agent too old, a malformed answer
    bad: bool = False  # the answer was malformed: a problem


def read_state(address: str) -> Answer:
    """What the node's agent on `address` answers to `state`, checked."""
    answer = ask_agent(address, "state")
    if answer is None:
        return Answer(None, "its agent does not answer")
    if answer.startswith("down #"):
        return Answer(None, "its agent does not report state (a netboot set made before builder added it: "
                            "`builder pxe build`, then publish again)")
    try:
        return Answer(parse(answer))
    except BadState as exc:
        return Answer(None, f"its agent's state answer is malformed ({exc})", bad=True)


def boot_words(root: Path, generation: str, stem: str) -> dict[str, str] | None:
    """The root, plan and firewall sha256 a generation's boot script for the node (its MAC stem) names."""
    script = root / "generations" / generation / "nodes" / f"{stem}.ipxe"
    try:
        text = script.read_text(encoding="ascii", errors="replace")[:65536]
    except OSError:
        return None
    out = {}
    for word in text.split():
        key, _, value = word.partition("=")
        if key in BOOT_WORDS and _HEX.fullmatch(value):
            out[BOOT_WORDS[key]] = value
    return out or None


def _matches(words: dict[str, str] | None, fields: dict[str, str]) -> bool:
    return words is not None and "root" in fields and "plan" in fields and \
        all(fields.get(key) == words.get(key) for key in BOOT_WORDS.values())


def generation(root: Path, stem: str, fields: dict[str, str]) -> dict[str, object]:
    """The generation the node should boot (`expected`: its pin's, else the current one; `pinned`) and the one
    whose boot files it booted (`running`: None when none in `root` matches)."""
    pinned = publish.pins(root).get(stem)
    expected = pinned or publish.current_id(root)
    running = expected if expected and _matches(boot_words(root, expected, stem), fields) else None
    if running is None:
        running = next((known.id for known in reversed(publish.generations(root))
                        if _matches(boot_words(root, known.id, stem), fields)), None)
    return {"expected": expected, "pinned": pinned is not None, "running": running}


def image_name(root: Path, gen: str | None, digest: str) -> str | None:
    """The image a generation's netboot set names for the image id `digest`, or None."""
    if gen is None:
        return None
    for entry in publish.generation_sets(root, gen):
        if f"sha256:{str(entry['image_digest']).removeprefix('sha256:')}" == digest:
            return str(entry["image"])
    return None


def node_document(answer: Answer, root: Path | None, stem: str) -> dict[str, object]:
    """A node's `state` in `cluster status --json`: its fields, grouped; None where the node has no state."""
    fields = answer.fields
    if fields is None:
        return {"state": None, "state_why": answer.why, "state_malformed": answer.bad}
    state: dict[str, object] = {}
    image: dict[str, str | None] | None = {"digest": fields["image"]} if "image" in fields else None
    if image is not None:
        state["image"] = image
    if "device" in fields:
        state["device"] = {"state": fields["device"], "devices": fields.get("devices", "").split(",")
                           if fields.get("devices") else [], "why": fields.get("device_why")}
    if "qualify" in fields:
        state["qualification"] = {"state": fields["qualify"], "device": fields.get("qualify_device"),
                                  "why": fields.get("qualify_why")}
    state["boot"] = {key: fields.get(key) for key in BOOT_WORDS.values()}
    if root is not None:
        gen = generation(root, stem, fields)
        state["generation"] = gen
        running = gen["running"]
        if image is not None:
            image["name"] = image_name(root, running if isinstance(running, str) else None, fields["image"])
    state["last_error"] = fields.get("error")
    return {"state": state}


def problems(name: str, entry: dict[str, object]) -> list[str]:
    """What the user must act on in a node's state: a degraded device, a qualification unqualified or failed on a
    device that is there (not on a degraded one: that is said once, nor on the fallback its file allows), a
    generation other than the one it should boot, an answer builder cannot read."""
    if entry.get("state_malformed"):
        return [f"{name}: {entry['state_why']}"]
    state = entry.get("state")
    if not isinstance(state, dict):
        return []
    found = []
    device = state.get("device") or {}
    if device.get("state") == "degraded":
        found.append(f"{name}'s device is degraded ({device.get('why') or 'no reason given'})")
    qualification = state.get("qualification") or {}
    # on a degraded device the qualification fails for the same reason (said once, above); on an allowed
    # fallback it cannot pass
    if qualification.get("state") in ("unqualified", "failed") and device.get("state") not in ("fallback",
                                                                                               "degraded"):
        found.append(f"{name}'s qualification: {qualification['state']} "
                     f"({qualification.get('why') or 'no reason given'})")
    gen = state.get("generation")
    if isinstance(gen, dict) and gen.get("expected") and gen.get("running") != gen["expected"]:
        should = f"{gen['expected']} ({'its pin' if gen['pinned'] else 'the current one'})"
        if gen.get("running"):
            found.append(f"{name} runs generation {gen['running']}, not {should}: reboot it")
        else:
            found.append(f"{name} booted files of no generation in pxe-root, not {should}: reboot it")
    return found
