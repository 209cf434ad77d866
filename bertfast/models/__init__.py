"""BertConfig, BertModel and every head, with Hugging Face's names."""
from .bert import (BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining, BertForQuestionAnswering,
                   BertForSequenceClassification, BertForTokenClassification, BertModel, BertModelOutput,
                   BertPreTrainedModel)
from .config import PRESETS, BertConfig
from .convert import from_hf

__all__ = ["BertConfig", "BertModel", "BertModelOutput", "BertPreTrainedModel", "BertForPreTraining",
           "BertForMaskedLM", "BertForNextSentencePrediction", "BertForSequenceClassification",
           "BertForTokenClassification", "BertForQuestionAnswering", "PRESETS", "from_hf"]
