"""DistilBERT on BERT's fused, padding-free encoder, with Hugging Face's names.

What differs from BERT: the names (`embeddings`, `transformer.layer.N.attention.{q,k,v,out}_lin`,
`sa_layer_norm`, `ffn.lin1/lin2`, `output_layer_norm`) and the config's (dim, n_layers, n_heads,
hidden_dim, dropout, attention_dropout, activation); no token types and no pooler; no dropout on
the attention output before its LayerNorm; optional sinusoidal position embeddings. The layer
computes what BertLayer computes, with the same fused ops and the same varlen attention.
Heads: `vocab_transform/vocab_layer_norm/vocab_projector` (MLM, projector tied to the word
embeddings), `pre_classifier` + ReLU + `classifier` on [CLS], per-token `classifier`, `qa_outputs`
after dropout.
"""
from __future__ import annotations

import torch
from torch import nn

from ._engine import ForwardContext, activation_fn, dense_act, dense_add_norm, embedding_layernorm_rows
from .bert import BertModel, BertPreTrainedModel, BertSelfAttention
from .config import BertConfig
from .heads import (MaskedLMHead, QuestionAnsweringHead, SequenceClassificationHead, TokenClassificationHead,
                    dense_act_layernorm, first_token)

# DistilBERT's config names -> the BertConfig fields the shared encoder reads
_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
          "hidden_dim": "intermediate_size", "dropout": "hidden_dropout_prob",
          "attention_dropout": "attention_probs_dropout_prob", "activation": "hidden_act"}
# BertConfig fields DistilBERT does not have (its LayerNorm eps is fixed at 1e-12, it has no token types)
_BERT_ONLY = ("type_vocab_size", "layer_norm_eps", "position_embedding_type", "classifier_dropout")


class DistilBertConfig(BertConfig):
    """HF's DistilBertConfig: reads and writes DistilBERT's names (dim, n_layers, ...), which are
    also attributes here; the BERT names (hidden_size, ...) are what the shared encoder reads."""

    model_type = "distilbert"

    def __init__(self, **kwargs):
        for ours, bert in _NAMES.items():
            if ours in kwargs:
                value = kwargs.pop(ours)
                if bert in kwargs and kwargs[bert] != value:
                    raise ValueError(f"DistilBertConfig: {ours}={value!r} and {bert}={kwargs[bert]!r} name the same "
                                     f"field; give one")
                kwargs[bert] = value
        defaults = dict(num_hidden_layers=6, intermediate_size=3072, type_vocab_size=1, layer_norm_eps=1e-12,
                        qa_dropout=0.1, seq_classif_dropout=0.2, sinusoidal_pos_embds=False)
        super().__init__(**{**defaults, **kwargs})

    def to_dict(self) -> dict:
        d = super().to_dict()
        for ours, bert in _NAMES.items():
            d[ours] = d.pop(bert)
        for key in _BERT_ONLY:
            d.pop(key, None)
        return d


for _ours, _bert in _NAMES.items():  # config.dim reads (and sets) config.hidden_size, ...
    setattr(DistilBertConfig, _ours, property(lambda self, b=_bert: getattr(self, b),
                                              lambda self, v, b=_bert: setattr(self, b, v)))


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """HF's create_sinusoidal_embeddings: sin on even columns, cos on odd ones."""
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    out = torch.empty(n_pos, dim, dtype=torch.float64)
    out[:, 0::2] = torch.sin(angle[:, 0::2])
    out[:, 1::2] = torch.cos(angle[:, 1::2])
    return out.float()


class DistilBertEmbeddings(nn.Module):
    """LN(word[ids] + pos[pos_ids]), dropout: the fused embedding op with a one-row zero table
    standing in for the token types DistilBERT does not have (made per call: no state, nothing
    for a meta-device build or a state dict to carry)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids, token_type_ids, position_ids, ranges_checked: bool = False):
        word = self.word_embeddings.weight
        return embedding_layernorm_rows(
            input_ids, token_type_ids, position_ids, word, self.position_embeddings.weight,
            word.new_zeros(1, word.shape[1]), self.LayerNorm, self.dropout_p if self.training else 0.0, ranges_checked)


class DistilBertSelfAttention(BertSelfAttention):
    """BERT's fused QKV projection and attention under DistilBERT's names: q_lin, k_lin, v_lin;
    out_lin (applied by the block, fused with the residual add and sa_layer_norm)."""

    query = property(lambda self: self.q_lin)
    key = property(lambda self: self.k_lin)
    value = property(lambda self: self.v_lin)

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        for bert, ours in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin")):
            setattr(self, ours, self._modules.pop(bert))
        self.out_lin = nn.Linear(config.hidden_size, config.hidden_size)


class FFN(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.lin2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = config.hidden_act
        self.dropout_p = config.hidden_dropout_prob
        activation_fn(config.hidden_act)  # an unknown name fails here


class TransformerBlock(nn.Module):
    """BertLayer's computation (same call signature, same workspace buffers) under DistilBERT's names."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = DistilBertSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)

    def forward(self, hidden, ctx: ForwardContext):
        rows = hidden.shape[0]
        context = self.attention(hidden, ctx)
        # no dropout between out_lin and the residual add in DistilBERT
        attn = dense_add_norm(context, self.attention.out_lin, hidden, self.sa_layer_norm, 0.0,
                              ctx.buffer("attn", rows, hidden.shape[1], hidden), ctx)
        inter = dense_act(attn, self.ffn.lin1, self.ffn.act, ctx)
        out = ctx.output_buffer("out", rows, hidden.shape[1], hidden)
        p = self.ffn.dropout_p if self.training else 0.0
        return dense_add_norm(inter, self.ffn.lin2, attn, self.output_layer_norm, p, out, ctx)


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([TransformerBlock(config) for _ in range(config.num_hidden_layers)])


class DistilBertPreTrainedModel(BertPreTrainedModel):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"
    pretraining_heads = ("vocab_transform", "vocab_layer_norm", "vocab_projector")
    tied_weight_keys = ()

    def init_weights(self):
        super().init_weights()
        if self.config.sinusoidal_pos_embds:
            for m in self.modules():
                if isinstance(m, DistilBertEmbeddings):
                    with torch.no_grad():
                        w = m.position_embeddings.weight
                        w.copy_(sinusoidal_positions(w.shape[0], w.shape[1]))


class DistilBertModel(DistilBertPreTrainedModel, BertModel):
    """BertModel's forward (packed varlen layers, padded outputs) on DistilBERT's modules: no pooler,
    no token types."""

    def __init__(self, config: DistilBertConfig):
        BertPreTrainedModel.__init__(self, config)
        self.embeddings = DistilBertEmbeddings(config)
        self.transformer = Transformer(config)
        self.pooler = None
        self.unpad = True  # see BertModel
        self.init_weights()

    @property
    def encoder(self):
        """The layers under BERT's name (read-only; HF's and the state dict's name is `transformer`)."""
        return self.transformer

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False, return_packed: bool = False, return_dict: bool = True):
        """BertModel's signature (what the heads and bertfast.accelerate call); token_type_ids must
        be None: DistilBERT has no token types."""
        if token_type_ids is not None:
            raise ValueError("token_type_ids must be None: DistilBERT has no token type embeddings")
        return BertModel.forward(self, input_ids, attention_mask, None, position_ids, output_hidden_states,
                                 return_packed, return_dict)

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen: int, token_type_ids=None, position_ids=None,
                       output_hidden_states: bool = False, pool: bool = True):
        if token_type_ids is not None:
            raise ValueError("token_type_ids must be None: DistilBERT has no token type embeddings")
        return BertModel.forward_packed(self, input_ids, cu_seqlens, max_seqlen, None, position_ids,
                                        output_hidden_states, pool)


class DistilBertForMaskedLM(MaskedLMHead, DistilBertPreTrainedModel):
    tied_weights = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.distilbert = DistilBertModel(config)
        self.vocab_transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.vocab_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.vocab_projector = nn.Linear(config.hidden_size, config.vocab_size)
        self.init_weights()

    def predict(self, hidden):
        return self.vocab_projector(dense_act_layernorm(hidden, self.vocab_transform, self.config.hidden_act,
                                                        self.vocab_layer_norm))


class DistilBertForSequenceClassification(SequenceClassificationHead, DistilBertPreTrainedModel):
    """pre_classifier -> ReLU -> dropout -> classifier on [CLS]."""

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.init_weights()

    def classify(self, hidden, attention_mask):
        pooled = torch.relu(self.pre_classifier(first_token(hidden, attention_mask)))
        return self.classifier(self.dropout(pooled))


class DistilBertForTokenClassification(TokenClassificationHead, DistilBertPreTrainedModel):
    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


class DistilBertForQuestionAnswering(QuestionAnsweringHead, DistilBertPreTrainedModel):
    def __init__(self, config: DistilBertConfig):
        if config.num_labels != 2:
            raise ValueError(f"DistilBertForQuestionAnswering needs config.num_labels == 2 (start, end), got "
                             f"{config.num_labels}")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout = nn.Dropout(config.qa_dropout)
        self.init_weights()

    def span_logits(self, hidden):
        return self.qa_outputs(self.dropout(hidden))


HEADS = {cls.__name__: cls for cls in (DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification,
                                       DistilBertForTokenClassification, DistilBertForQuestionAnswering)}
