"""Encoders for 03_embeddings, BERT-based with a WordPiece vocabulary trained on CORPUS: a
sentence-transformer (plain and with remote code), a cross-encoder and a SPLADE sparse encoder."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tests.shared.tiny_models.corpus import SEED
from tests.shared.tiny_models.vocabularies import train_wordpiece


def _train_wordpiece(vocab_size: int = 400):
    """A BERT-style WordPiece tokenizer trained on CORPUS (no download), the same on every build."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = train_wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], vocab_size)
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
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


def build_cross_encoder(out: Path) -> Path:
    """A BERT cross-encoder (one relevance logit per query-document pair), like BAAI/bge-reranker-base."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    tokenizer = _train_wordpiece()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        BertForSequenceClassification(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        CrossEncoder(tmp, device="cpu", max_length=128).save(str(out))
    return out


_REMOTE_CODE = """\"\"\"A BERT whose hidden states come out with their halves interleaved (einops).\"\"\"

import einops
from transformers import BertConfig, BertModel


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote-bert"


class TinyRemoteModel(BertModel):
    config_class = TinyRemoteConfig

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.last_hidden_state = einops.rearrange(
            output.last_hidden_state, "b s (two half) -> b s (half two)", two=2
        )
        return output
"""


def build_remote_code_sentence_transformer(out: Path) -> Path:
    """The tiny BERT sentence-transformer with its model class in the folder's own code
    (`modeling_tiny_remote.py`, importing einops), loaded only with trust_remote_code=True, as
    nomic-embed and jina-embeddings are. Its embeddings are the plain tiny model's with the
    dimensions' halves interleaved, so a test can tell the remote code ran."""
    build_sentence_transformer(out)
    (out / "modeling_tiny_remote.py").write_text(_REMOTE_CODE)
    config = json.loads((out / "config.json").read_text())
    config.update(
        model_type="tiny-remote-bert",
        architectures=["TinyRemoteModel"],
        auto_map={
            "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
            "AutoModel": "modeling_tiny_remote.TinyRemoteModel",
        },
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# The SPLADE model's MLM head sees a token's own embedding at its position (no attention or feed-forward
# contribution, no position embeddings): at 256 dimensions its own logit is ~180-260, every other
# ~0 ± 16 (under 80 across the vocabulary). This bias keeps only the first, so each text's sparse
# vector is the bag of its tokens. (At 64 dimensions the margin was ~5: a vocabulary trained in
# another order now and then let a foreign term through.)
_SPLADE_BIAS = -120.0
# Far below any logit: special tokens ([CLS], [SEP]...) are in every text and would match every text.
_SPLADE_SPECIAL_BIAS = -1000.0


def build_splade(out: Path) -> Path:
    """A SPLADE sparse encoder (BERT masked-LM → SpladePooling, max), like naver/splade-v3, loaded
    with sentence-transformers' SparseEncoder. Random weights, except that the layers add nothing
    to a token's embedding and the MLM head's bias cuts what does not match it: each text's vector
    holds exactly its own (non-special) tokens, with weights log(1 + logit), so a sparse search is
    a true lexical match and tests can tell which documents share words with a query."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(SEED)
    tokenizer = _train_wordpiece()
    hidden = 256  # enough dimensions that a random embedding's match with itself stands out from the rest
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertForMaskedLM(config)  # decoder tied to the word embeddings
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
        model.bert.embeddings.position_embeddings.weight.zero_()
        model.bert.embeddings.token_type_embeddings.weight.zero_()
        for layer in model.bert.encoder.layer:  # residual-only layers: the LayerNorms pass the embedding on
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        transform = model.cls.predictions.transform
        transform.dense.weight.copy_(torch.eye(hidden))
        transform.dense.bias.zero_()
        model.cls.predictions.bias.fill_(_SPLADE_BIAS)
        model.cls.predictions.bias[tokenizer.all_special_ids] = _SPLADE_SPECIAL_BIAS
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=32, transformer_task="fill-mask")
        pooling = SpladePooling("max", embedding_dimension=len(tokenizer))
        SparseEncoder(modules=[transformer, pooling], device="cpu").save(str(out))
    return out
