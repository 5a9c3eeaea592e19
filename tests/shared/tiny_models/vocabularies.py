"""Tokenizer vocabularies trained on CORPUS that several families share: CLIP's BPE (the Stable Diffusion
text encoders, FLUX, SD 3.5 and CLIPModel), BERT's WordPiece (03's encoders) and a SentencePiece
unigram model (SigLIP, T5)."""

from __future__ import annotations

import itertools
import json
import operator
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.shared.tiny_models.corpus import CORPUS

_CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) byte alphabet, in its vocabulary order: printable bytes stand for
    themselves, the others are shifted to code points 256+ so no token holds whitespace or controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def _bpe_merges(
    words: Counter[tuple[str, ...]], join: Callable[[str, str], str]
) -> Iterator[tuple[tuple[str, str], str]]:
    """BPE over word counts: each next merge (the pair, and the symbol `join` makes of it) is the
    most frequent pair of adjacent symbols (among equally frequent pairs, the first in order, so
    every build learns the same), merged in every word before the next is counted; until every
    word is a single symbol."""
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            return
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        joined = join(*best)
        yield best, joined
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            symbols: list[str] = []
            for symbol in word:
                if symbols and (symbols[-1], symbol) == best:
                    symbols[-1] = joined
                else:
                    symbols.append(symbol)
            merged[tuple(symbols)] += n
        words = merged


def train_clip_bpe(max_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, learnt from CORPUS split the way CLIPTokenizer splits text.

    As in the real vocab.json: the 256 byte symbols, the same with the "</w>" end-of-word suffix,
    one token per merge, then the two specials. Having every byte, with and without suffix, means
    any text (emoji, CJK) encodes without unknown tokens. A few lines of BPE rather than the
    `tokenizers` trainer, whose order among equally frequent pairs changes from run to run when
    an end-of-word suffix is set.
    """
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # an empty vocabulary, but CLIP's normalizer and pre-tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(CORPUS)):
        words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = [pair for pair, _ in itertools.islice(_bpe_merges(words, operator.add), max_merges)]
    alphabet = _bytes_to_unicode()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), *_CLIP_SPECIALS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def train_wordpiece(specials: list[str], vocab_size: int = 400) -> list[str]:
    """A BERT WordPiece vocabulary learnt from CORPUS the way `tokenizers`' WordPieceTrainer learns
    one: BPE merges over words split into their first character and "##"-marked continuations,
    each merge a token, after the specials and every character seen. Ties among equally frequent
    pairs go to the first pair in order. The trainer leaves them to a hash map, so its vocabulary
    changed from build to build, and with it every tiny encoder's outputs: a test that passed on
    one build of the tiny models once failed on the next (the rerank truncation test, 2026-12-07).
    """
    from tokenizers import normalizers, pre_tokenizers

    text = normalizers.BertNormalizer(lowercase=True).normalize_str(CORPUS)
    words: Counter[tuple[str, ...]] = Counter()
    for word, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(text):
        words[(word[0], *("##" + c for c in word[1:]))] += 1
    vocab = list(dict.fromkeys([*specials, *sorted({symbol for word in words for symbol in word})]))
    merges = _bpe_merges(words, lambda first, then: first + then.removeprefix("##"))
    while len(vocab) < vocab_size and (merge := next(merges, None)) is not None:
        if (joined := merge[1]) not in vocab:
            vocab.append(joined)
    return vocab


def write_clip_vocab(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """transformers 5 saves tokenizer.json only; the real checkpoints also carry vocab.json and
    merges.txt, which transformers 4's slow CLIPTokenizer needs."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def train_sentencepiece(folder: Path, vocab_size: int = 200) -> Path:
    """A SentencePiece unigram model trained on CORPUS (no download), with SigLIP's special ids:
    <pad> 0, </s> 1, <unk> 2, as google/siglip-base-patch16-224's spiece.model has them."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return path
