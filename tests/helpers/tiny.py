"""Tiny random-weight transformers for the plumbing tests.

A test that checks wiring, formats, resume, parity, serving, deploy, gc or drift needs a model of
the right *kind*, not a good one: these are built from a config (BERT, 2 layers, hidden 32, 2 heads)
over the builtin model's real tokenizer (all-MiniLM-L6-v2: uncased English WordPiece, 30,522
tokens), so tokenization, truncation, segment ids and the unknown-token share are exactly those of
the real model, while a fine-tune takes a second instead of a minute. Only the tests that assert
that a model *learns* use the real all-MiniLM-L6-v2 (tests/conftest.py lists them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# the tokenizer files of a transformers model folder (the real model's, copied as they are)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
             # 5x the usual 0.02: a random network whose outputs move with its inputs (segment ids change a
             # pair score by more than 1e-3 after one epoch), as a pretrained one's do
             "initializer_range": 0.1}


def build_tiny_bert(source: Path, out: Path, seed: int = 0) -> Path:
    """A random-weight BERT encoder (`BertModel`, TINY_BERT sizes) with the tokenizer of the model
    folder `source`, saved to `out` as any pretrained model folder is (config.json,
    model.safetensors, tokenizer files): the steps load it with from_pretrained like the real one."""
    import torch
    from transformers import BertConfig, BertModel

    real = BertConfig.from_pretrained(source)
    config = BertConfig(vocab_size=real.vocab_size, max_position_embeddings=real.max_position_embeddings,
                        type_vocab_size=real.type_vocab_size, pad_token_id=real.pad_token_id, **TINY_BERT)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out
