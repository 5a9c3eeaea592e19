"""Build tiny random-weight models of the real architectures the examples serve, offline.

Every example loads its model from `MODEL_NAME`, a Hub id or a local folder. The folders this
module writes are real checkpoints of the same architectures (same config classes, tokenizers
and file layout as the Hub models), only with a hidden size of 32-64 and two layers, so each
handler runs its real code path on CPU in seconds, without network access.

Try a handler offline with one:

    python tests/tiny_models.py sentence-transformer /tmp/tiny-embedder
    cd 03_embeddings && MODEL_NAME=/tmp/tiny-embedder python handler.py

Builds are deterministic: the same kind always gives the same weights and vocabulary.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# A few hundred words of varied English, so trained tokenizers have a real vocabulary and
# tests can send ordinary sentences without every word falling back to unknown tokens.
CORPUS = """
The quick brown fox jumps over the lazy dog. A serverless worker loads its model once and then
answers many jobs. Cats and dogs are popular pets; people love them. The weather today is sunny
with a light breeze, and tomorrow it may rain. Paris is the capital of France, Berlin is the
capital of Germany, and Tokyo is the capital of Japan. Machine learning models turn text into
vectors, and similar sentences get similar vectors. A GPU makes inference fast. Stock markets
rose after the central bank held interest rates. The recipe needs flour, sugar, eggs and butter.
Football fans cheered as their team scored in the final minute. Please summarise this document in
three sentences. What is the meaning of life? How do I reset my password? The train to London
leaves at nine o'clock. Photosynthesis converts sunlight, water and carbon dioxide into sugar.
Write a short poem about the sea. Translate hello into Spanish: hola. Numbers: 0 1 2 3 4 5 6 7 8 9.
Café, naïve, jalapeño, 東京, Здравствуйте, 😀 — unicode text must survive every step.
""".strip()

SEED = 0


def _train_wordpiece(vocab_size: int = 400):
    """A BERT-style WordPiece tokenizer trained on CORPUS (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([CORPUS] * 4, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_sentence_transformer(out: Path) -> Path:
    """A BERT sentence-transformer (Transformer → mean Pooling → Normalize), like all-MiniLM-L6-v2.

    It defines `query`/`document` prompts (as E5- and BGE-style models do) and a short maximum
    sequence length of 32 tokens, so tests can reach prompt handling and truncation cheaply.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    tokenizer = _train_wordpiece()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with tempfile.TemporaryDirectory() as tmp:
        BertModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = models.Transformer(tmp, max_seq_length=32)
        pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        model = SentenceTransformer(
            modules=[transformer, pooling, models.Normalize()],
            prompts={"query": "query: ", "document": "passage: "},
            device="cpu",
        )
        model.save(str(out))
    return out


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sentence-transformer": build_sentence_transformer,
}


def build(kind: str, out: str | Path) -> Path:
    """Build the tiny model `kind` into the folder `out` and return the folder."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(BUILDERS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return BUILDERS[kind](out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(BUILDERS), help="which architecture to build")
    parser.add_argument("out", help="folder to write the model to (use it as MODEL_NAME)")
    args = parser.parse_args(argv)
    path = build(args.kind, args.out)
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
