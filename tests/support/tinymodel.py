"""Write a tiny random-weight llama GGUF model for tests.

Tests never download model weights: they have to run offline, quickly and the
same way every time. So a test that needs llama-server to load a model and
generate text builds one here instead, from a vocab-only GGUF that ships with
llama.cpp (models/ggml-vocab-llama-spm.gguf) and seeded random weights.

The weights are noise, so the text is nonsense, but it is real generation:
tokenizer, every layer and the sampler all run. The file is about 9 MB and is
byte-identical for the same arguments. The weight spread (std) is large on
purpose: with a small one (0.02) greedy decoding repeats a single token.

Usage: python tests/support/tinymodel.py VOCAB_GGUF OUT_GGUF
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ARCH = "llama"
NAME = "builder-tiny"
CONTEXT_LENGTH = 2048
RMS_EPS = 1e-5
FILE_TYPE_MOSTLY_F16 = 1


def copy_tokenizer_fields(vocab_gguf: Path, writer: gguf.GGUFWriter) -> int:
    """Copy every tokenizer.* field, with its GGUF types, and return the vocab size."""
    reader = gguf.GGUFReader(vocab_gguf)
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"{vocab_gguf}: nested array in {key} is not supported")
            item_type = field.types[1]
            items: list[Any]
            if item_type == gguf.GGUFValueType.STRING:
                # raw bytes, so tokens are copied exactly even if not valid UTF-8
                items = [bytes(field.parts[i]) for i in field.data]
            else:
                items = field.contents()
            writer.add_key_value(key, items, value_type, sub_type=item_type)
            if key == gguf.Keys.Tokenizer.LIST:
                n_vocab = len(items)
        elif value_type == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[-1]), value_type)
        else:
            writer.add_key_value(key, field.contents(), value_type)
    if n_vocab == 0:
        raise ValueError(f"{vocab_gguf}: no {gguf.Keys.Tokenizer.LIST} array")
    return n_vocab


def make_tiny_model(
    vocab_gguf: Path,
    out: Path,
    *,
    seed: int = 1234,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    std: float = 0.5,
) -> Path:
    """Write a deterministic random-weight llama model to `out` and return `out`."""
    if n_embd % n_head != 0:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    out = Path(out)
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray[Any, np.dtype[np.float16]]:
        # numpy shape (rows, cols) is GGUF ne = [cols, rows]
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)

    def ones(n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ones(n, dtype=np.float32)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        writer.add_name(NAME)
        writer.add_file_type(FILE_TYPE_MOSTLY_F16)
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_rope_dimension_count(n_embd // n_head)
        n_vocab = copy_tokenizer_fields(vocab_gguf, writer)
        writer.add_vocab_size(n_vocab)

        # tensors are generated in this fixed order, so the bytes depend only on the arguments
        writer.add_tensor("token_embd.weight", matrix(n_vocab, n_embd))
        for i in range(n_layer):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(n_embd))
            writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(n_embd))
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff))
        writer.add_tensor("output_norm.weight", ones(n_embd))
        writer.add_tensor("output.weight", matrix(n_vocab, n_embd))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(0o644)  # mkstemp makes 0600; containers may read the model as another user
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tests/support/tinymodel.py VOCAB_GGUF OUT_GGUF", file=sys.stderr)
        return 2
    path = make_tiny_model(Path(argv[0]), Path(argv[1]))
    print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
