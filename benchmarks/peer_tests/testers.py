"""Model testers for transformers' shared model tests (ModelTesterMixin), one per
BERT-family model_type. transformers' per-model test files live only in its repository; these are
our own small stand-ins for them: a tiny config, the common inputs, the list of classes. run.sh
copies the transformers sdist's tests/ next to this file (as tests/peer_testers.py) and runs the
mixin's tests (ModelTesterMixin: outputs, hidden states, attentions, training, gradient
checkpointing, save/load, resizing, batching equivalence, ...)."""
from __future__ import annotations

import unittest

import transformers
from transformers.testing_utils import require_torch

from .test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

# model_type -> (config class, config kwargs of a tiny model, model classes, whether it has token types)
_TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
             max_position_embeddings=512, type_vocab_size=16, initializer_range=0.02, is_decoder=False)
FAMILIES = {
    "bert": ("BertConfig", _TINY, ["BertModel", "BertForMaskedLM", "BertForMultipleChoice",
                                   "BertForNextSentencePrediction", "BertForPreTraining", "BertForQuestionAnswering",
                                   "BertForSequenceClassification", "BertForTokenClassification", "BertLMHeadModel"],
             True),
    "roberta": ("RobertaConfig", _TINY, ["RobertaModel", "RobertaForMaskedLM", "RobertaForMultipleChoice",
                                         "RobertaForQuestionAnswering", "RobertaForSequenceClassification",
                                         "RobertaForTokenClassification", "RobertaForCausalLM"], True),
    "electra": ("ElectraConfig", {**_TINY, "embedding_size": 32},
                ["ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForMultipleChoice",
                 "ElectraForQuestionAnswering", "ElectraForSequenceClassification", "ElectraForTokenClassification",
                 "ElectraForCausalLM"], True),
    "distilbert": ("DistilBertConfig", dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                            activation="gelu", dropout=0.1, attention_dropout=0.1,
                                            max_position_embeddings=512, initializer_range=0.02),
                   ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForMultipleChoice",
                    "DistilBertForQuestionAnswering", "DistilBertForSequenceClassification",
                    "DistilBertForTokenClassification"], False),
}


class FamilyTester:
    def __init__(self, parent, model_type, batch_size=13, seq_length=7, is_training=True):
        self.parent, self.model_type = parent, model_type
        cfg_name, self.config_kwargs, _, self.token_types = FAMILIES[model_type]
        self.config_class = getattr(transformers, cfg_name)
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        self.vocab_size, self.num_choices, self.num_labels = 99, 4, 3
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4

    def get_config(self):
        return self.config_class(**self.config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        inputs = {"input_ids": ids_tensor([self.batch_size, self.seq_length], self.vocab_size),
                  "attention_mask": random_attention_mask([self.batch_size, self.seq_length])}
        if self.token_types:
            inputs["token_type_ids"] = ids_tensor([self.batch_size, self.seq_length], 16)
        return self.get_config(), inputs


def make_test_case(model_type):
    _, _, classes, _ = FAMILIES[model_type]

    @require_torch
    class FamilyModelTest(ModelTesterMixin, unittest.TestCase):
        all_model_classes = tuple(getattr(transformers, c) for c in classes)

        def setUp(self):
            self.model_tester = FamilyTester(self, model_type)

    FamilyModelTest.__name__ = FamilyModelTest.__qualname__ = f"{model_type.title()}PeerModelTest"
    return FamilyModelTest
