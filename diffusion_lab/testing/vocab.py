"""A tokenizer and text encoder for a small vocabulary, built from the captions' words offline.

    tok = vocab_tokenizer(caption_words(["a handwritten digit {name}"]))   # one token per word
    enc = vocab_text_encoder(tok, hidden_size=64)                         # random CLIPTextModel
    save_text_model(tok, enc, "outputs/digits_text")                      # tokenizer/ + text_encoder/

The tokenizer is a real ``CLIPTokenizer`` (byte-level BPE): its merges are learned with
BPE (``learn_merges``) until every caption word is a single token, so "a handwritten digit seven"
is four tokens; any other word still tokenizes, byte by byte. ``model_max_length`` is short
(captions are a few words), which keeps the text encoder and cross-attention cheap.
``testing/tiny.py`` builds the tiny SD tokenizer and text encoders with the same
``clip_vocab`` and ``clip_text_encoder``.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Sequence

import torch

from diffusion_lab.data.digits import DIGIT_NAMES


def caption_words(templates: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The distinct lower-cased words of ``templates`` filled with every digit name (and ``extra``)."""
    words = []
    for template in templates:
        for d, name in enumerate(DIGIT_NAMES):
            words += template.format(name=name, digit=d).lower().split()
    return list(dict.fromkeys(words + [w.lower() for w in extra]))


def learn_merges(words: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al. 2016) on ``words`` with CLIP's ``</w>`` word end."""
    vocab = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, n in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, n in vocab.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        vocab = merged
    return merges


def clip_vocab(words: Sequence[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level CLIP BPE: 512 byte tokens (+ ``</w>`` forms), up to
    ``num_merges`` merges learned on ``words``, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_merges(list(words), num_merges=num_merges)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def vocab_tokenizer(words: Sequence[str], model_max_length: int = 16):
    """A ``CLIPTokenizer`` in which each of ``words`` is one token (merged until no pair is left)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(words, num_merges=sum(len(w) for w in words))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def clip_text_encoder(tokenizer, hidden_size: int, num_hidden_layers: int = 2, num_attention_heads: int = 4, with_projection: bool = False, seed: int = 0):
    """A random ``CLIPTextModel`` (or ``...WithProjection``, SDXL's second encoder) for ``tokenizer``:
    states ``[N, tokenizer.model_max_length, hidden_size]``. Seeded without touching the global RNG."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def vocab_text_encoder(tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4, seed: int = 0):
    """A random ``CLIPTextModel`` for ``tokenizer``: states ``[N, model_max_length, hidden_size]``."""
    return clip_text_encoder(tokenizer, hidden_size, num_hidden_layers, num_attention_heads, seed=seed)


def save_text_model(tokenizer, text_encoder, out: str | Path) -> Path:
    """``out/tokenizer`` and ``out/text_encoder`` in transformers format (written atomically)."""
    from diffusion_lab.utils.io import atomic_dir

    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        text_encoder.save_pretrained(Path(tmp) / "text_encoder", safe_serialization=True)
    return Path(out)


# ---- T5 (SD3's third and Flux's second text encoder) -------------------------------------------
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2: pad, end of sequence, unknown


def t5_vocab(words: Sequence[str], vocab_size: int = 200) -> list[tuple[str, float]]:
    """(piece, log-probability) pairs of a SentencePiece-style unigram vocabulary (Kudo 2018) learned
    offline on ``words`` by the ``tokenizers`` library's ``UnigramTrainer``, as T5's ``spiece.model``
    is: ``<pad>``, ``</s>``, ``<unk>`` first, ``▁`` marking word starts, every ASCII letter, digit and
    punctuation mark kept as a piece so any ASCII text tokenizes (other characters are ``<unk>``)."""
    import json
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(T5_SPECIALS), unk_token="<unk>", initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator([" ".join(words)], trainer)
    return [(piece, float(score)) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]]


def t5_tokenizer(words: Sequence[str], vocab_size: int = 200, model_max_length: int = 512):
    """A real ``T5TokenizerFast`` on the ``t5_vocab`` of ``words`` (no sentinel ``<extra_id_*>``
    tokens: they are for T5's span-corruption pre-training, which text encoders never see)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(words, vocab_size), extra_ids=0, model_max_length=model_max_length)


def t5_text_encoder(tokenizer, d_model: int, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """A random ``T5EncoderModel`` (T5 v1.1 layout: gated-GELU feed-forward) for ``tokenizer``:
    states ``[N, L, d_model]``. Seeded without touching the global RNG."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config)
