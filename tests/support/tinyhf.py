"""A tiny random-weight llama model in Hugging Face format, and transformers' greedy text on it.

Runs inside the cpu vLLM image, which carries torch, transformers, tokenizers and safetensors, so the
test's own virtual environment needs none of them. Nothing is downloaded: the tokenizer is a byte-level
BPE trained here on the few lines of CORPUS, the weights are seeded noise.

Usage: python3 tinyhf.py MODEL_DIR REQUESTS_JSON OUT_JSON

REQUESTS_JSON holds {"max_tokens": N, "prompt": TEXT, "messages": [CHAT MESSAGES]}. The script writes the
model folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja …),
loads it back from disk as any user of transformers would, and writes OUT_JSON with, for the raw prompt and
for the chat prompt: the prompt's token ids, the greedy continuation's token ids and text, the smallest gap
between the best and the second-best logit over all steps, and the largest logit
(test_engines_vllm_serve.py says why these make an exact comparison sound).

The byte-level tokenizer's alphabet is the corpus's ASCII characters only, so every token decodes to whole
characters and a continuation's text is exactly the concatenation of its tokens' texts, however a server
detokenizes it (all at once, or token by token while streaming); the script checks that.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CORPUS = """\
the quick brown fox jumps over the lazy dog.
a small model can still say many different words, one after another.
once upon a time there was a tiny machine that learned to count: one, two, three, four.
user: tell me a story about the sea.
assistant: the sea was calm and the boats came home at night.
every test asks a question and waits for the answer it expects.
""".splitlines()

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SEED = 20261129
WEIGHT_STD = 0.5  # large on purpose: with the usual 0.02, greedy decoding repeats one token


def make_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # No initial_alphabet: the vocabulary holds only the bytes of the corpus (all ASCII), never a lone
    # byte of a multi-byte character.
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=1, special_tokens=["<s>", "</s>"],
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_model(folder: Path, vocab_size: int, bos: int, eos: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, dtype="float32")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, WEIGHT_STD)
            elif "norm" not in name:
                raise SystemExit(f"unexpected parameter {name}")
    model.save_pretrained(folder)


def greedy(model: Any, tokenizer: Any, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """Greedy decoding written out: the whole sequence through the model at every step, no cache."""
    import torch

    ids = list(prompt_ids)
    gaps: list[float] = []
    scale = 0.0
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2)
            gaps.append(float(top.values[0] - top.values[1]))
            scale = max(scale, float(logits.abs().max()))
            ids.append(int(top.indices[0]))
            if ids[-1] == tokenizer.eos_token_id:
                break
    generated = ids[len(prompt_ids):]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    if whole != tokenizer.decode(prompt_ids, skip_special_tokens=True) + text:
        raise SystemExit(f"decoding is not a concatenation: {whole!r}")
    return {"prompt_ids": prompt_ids, "ids": generated, "text": text, "min_gap": min(gaps), "max_logit": scale}


def main(folder: Path, requests_path: Path, out_path: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = json.loads(requests_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    made = make_tokenizer(folder)
    make_model(folder, len(made), made.bos_token_id, made.eos_token_id)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    prompt_ids = tokenizer(request["prompt"])["input_ids"]
    if tokenizer.decode(prompt_ids) != request["prompt"]:
        raise SystemExit(f"the tokenizer does not round-trip the prompt: {tokenizer.decode(prompt_ids)!r}")
    chat_text = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    result = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "vocab_size": len(tokenizer),
        "completion": greedy(model, tokenizer, prompt_ids, request["max_tokens"]),
        "chat": {"prompt_text": chat_text, **greedy(model, tokenizer, chat_ids, request["max_tokens"])},
    }
    out_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
