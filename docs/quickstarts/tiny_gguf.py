"""Write a tiny random-weight llama model as a GGUF file, to try a cluster without downloading a model.

    python tiny_gguf.py OUT.gguf [--seed N]

The file is 260 KB: 2 layers, 64 wide, and a vocabulary of its own (the 256 byte tokens a SentencePiece
tokenizer falls back to, a word-start marker and every printable ASCII character). Its weights are seeded
noise, so llama-server loads it and really generates, but the text is printable nonsense.

Only Python's standard library is used, and the bytes depend only on the seed: the same seed gives the same
file, and so the same sha256, on every machine, which is what lets a cluster file name it. Another seed gives
another model. The layout is GGUF version 3 (llama.cpp's docs/gguf.md in the ggml repository).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
from pathlib import Path

LAYERS, WIDTH, HEADS, FEED_FORWARD, CONTEXT = 2, 64, 4, 128, 2048
ALIGNMENT = 32
# GGUF value types and tensor types used here
UINT32, INT32, FLOAT32, STRING, ARRAY = 4, 5, 6, 8, 9
TENSOR_F32, TENSOR_F16 = 0, 1
# SentencePiece token types, as llama.cpp reads them
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
SPECIAL = 3 + 256  # <unk>, <s>, </s> and the byte tokens come first


def vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, their scores and types: <unk>, <s>, </s>, the byte fallbacks, the word start, printable ASCII."""
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{b:02X}>".encode() for b in range(256))]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256]
    tokens += ["\u2581".encode(), *(bytes([c]) for c in range(33, 127))]
    types += [NORMAL] * 95
    scores = [0.0] * SPECIAL + [-float(i) for i in range(95)]
    return tokens, scores, types


def string(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def metadata(tokens: list[bytes], scores: list[float], types: list[int]) -> list[bytes]:
    """Every key/value pair, encoded."""

    def scalar(key: str, kind: int, fmt: str, value: float) -> bytes:
        return string(key.encode()) + struct.pack("<I" + fmt, kind, value)

    def text(key: str, value: str) -> bytes:
        return string(key.encode()) + struct.pack("<I", STRING) + string(value.encode())

    def array(key: str, kind: int, items: list[bytes]) -> bytes:
        return string(key.encode()) + struct.pack("<IIQ", ARRAY, kind, len(items)) + b"".join(items)

    return [
        text("general.architecture", "llama"),
        text("general.name", "tiny-random"),
        scalar("general.file_type", UINT32, "I", 1),  # mostly f16
        scalar("llama.context_length", UINT32, "I", CONTEXT),
        scalar("llama.embedding_length", UINT32, "I", WIDTH),
        scalar("llama.block_count", UINT32, "I", LAYERS),
        scalar("llama.feed_forward_length", UINT32, "I", FEED_FORWARD),
        scalar("llama.attention.head_count", UINT32, "I", HEADS),
        scalar("llama.attention.head_count_kv", UINT32, "I", HEADS),
        scalar("llama.attention.layer_norm_rms_epsilon", FLOAT32, "f", 1e-5),
        scalar("llama.rope.dimension_count", UINT32, "I", WIDTH // HEADS),
        scalar("llama.vocab_size", UINT32, "I", len(tokens)),
        text("tokenizer.ggml.model", "llama"),
        array("tokenizer.ggml.tokens", STRING, [string(t) for t in tokens]),
        array("tokenizer.ggml.scores", FLOAT32, [struct.pack("<f", s) for s in scores]),
        array("tokenizer.ggml.token_type", INT32, [struct.pack("<i", t) for t in types]),
        scalar("tokenizer.ggml.unknown_token_id", UINT32, "I", 0),
        scalar("tokenizer.ggml.bos_token_id", UINT32, "I", 1),
        scalar("tokenizer.ggml.eos_token_id", UINT32, "I", 2),
    ]


def tensors(seed: int, vocab: int) -> list[tuple[str, list[int], int, bytes]]:
    """(name, dimensions with the row length first, type, data) of every tensor, in a fixed order."""
    rng = random.Random(seed)

    def matrix(name: str, rows: int, cols: int, zero_rows: int = 0) -> tuple[str, list[int], int, bytes]:
        # a wide spread (0.5): with a small one greedy decoding repeats one token
        values = [0.0 if r < zero_rows else rng.gauss(0.0, 0.5) for r in range(rows) for _ in range(cols)]
        return name, [cols, rows], TENSOR_F16, struct.pack(f"<{len(values)}e", *values)

    def ones(name: str) -> tuple[str, list[int], int, bytes]:
        return name, [WIDTH], TENSOR_F32, struct.pack(f"<{WIDTH}f", *[1.0] * WIDTH)

    out = [matrix("token_embd.weight", vocab, WIDTH)]
    for i in range(LAYERS):
        out.append(ones(f"blk.{i}.attn_norm.weight"))
        out += [matrix(f"blk.{i}.attn_{part}.weight", WIDTH, WIDTH) for part in ("q", "k", "v", "output")]
        out.append(ones(f"blk.{i}.ffn_norm.weight"))
        out += [matrix(f"blk.{i}.ffn_gate.weight", FEED_FORWARD, WIDTH),
                matrix(f"blk.{i}.ffn_up.weight", FEED_FORWARD, WIDTH),
                matrix(f"blk.{i}.ffn_down.weight", WIDTH, FEED_FORWARD)]
    out.append(ones("output_norm.weight"))
    # the special and byte tokens never win: the text is printable ASCII and does not end early
    out.append(matrix("output.weight", vocab, WIDTH, zero_rows=SPECIAL))
    return out


def pad(size: int) -> bytes:
    return b"\0" * (-size % ALIGNMENT)


def gguf_bytes(seed: int) -> bytes:
    tokens, scores, types = vocabulary()
    pairs = metadata(tokens, scores, types)
    parts = tensors(seed, len(tokens))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(parts), len(pairs)) + b"".join(pairs)
    offset, data = 0, b""
    for name, dims, kind, blob in parts:
        head += string(name.encode()) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
        data += blob + pad(len(blob))
        offset = len(data)
    return head + pad(len(head)) + data


def main() -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight llama GGUF (260 KB).")
    parser.add_argument("out", type=Path, help="the GGUF file to write; its folder is made if missing")
    parser.add_argument("--seed", type=int, default=1, help="another seed gives another model (default 1)")
    args = parser.parse_args()
    out: Path = args.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(gguf_bytes(args.seed))
            os.chmod(name, 0o644)  # containers may read the model as another user
            os.replace(name, out)
        except BaseException:
            os.unlink(name)
            raise
    except OSError as exc:
        sys.exit(f"error: {out}: {exc.strerror or exc}")
    print(f"{out}  {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
