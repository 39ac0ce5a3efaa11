"""Builders for the model / tokenizer / data sources users bring: a tiny `tokenizers` BPE tokenizer folder with a
chat template, a tiny random transformers Llama beside it, and a huggingface_hub cache laid out by hand (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# A Llama-3-like chat template: bos, role headers, end-of-turn token, an open assistant header on request.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' }}\n"
    "{{ message['content'] | trim }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = [
    "What is 12 plus 30? The answer is 42.", "Q: 7 times 6\nA: 42", "héllo wörld 🙂", "Compute 3 + 4. It is 7.",
    "How many legs do 2 cats have? 8", "The final answer is $\\frac{1}{2}$.",
]
TOKENIZER_VOCAB = 300


def write_tokenizer(folder: Path, *, template_file: bool = False, generation_eos: list[int] | None = None) -> Path:
    """A byte-level BPE tokenizer.json of TOKENIZER_VOCAB tokens + tokenizer_config.json (bos <s>, eos <|end|>, the chat
    template inline or, with `template_file`, as chat_template.jinja) + generation_config.json (eos ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template_file:
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    else:
        config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    eos = generation_eos if generation_eos is not None else [SPECIAL_TOKENS.index("</s>"), SPECIAL_TOKENS.index("<|end|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


def write_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """A random transformers LlamaForCausalLM (vocabulary = the tokenizer's) with `write_tokenizer`'s files beside it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False,
                                      bos_token_id=0, eos_token_id=5)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    return write_tokenizer(folder)


def add_to_hub_cache(cache: Path, repo_id: str, files: Path, *, commit: str = "0" * 40,
                     refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay out `files` (a folder) as huggingface_hub caches a model repo: models--org--name/refs/<ref> holding the
    commit hash, snapshots/<commit>/ holding the files. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
