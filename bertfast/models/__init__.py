"""BertConfig, BertModel and every head, with Hugging Face's names; the BERT family (RoBERTa,
XLM-RoBERTa, DistilBERT, ELECTRA) on the same encoder; `from_hf` and the registry of HF names
(convert.py)."""
from .bert import BertModel, BertPreTrainedModel
from .heads import (BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining, BertForQuestionAnswering,
                    BertForSequenceClassification, BertForTokenClassification)
from .outputs import BertModelOutput
from .config import PRESETS, BertConfig
from .distilbert import (DistilBertConfig, DistilBertForMaskedLM, DistilBertForQuestionAnswering,
                         DistilBertForSequenceClassification, DistilBertForTokenClassification, DistilBertModel)
from .electra import (ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining, ElectraForQuestionAnswering,
                      ElectraForSequenceClassification, ElectraForTokenClassification, ElectraModel)
from .convert import CLASSES, MODEL_TYPES, config_from_hf, from_hf, model_class
from .roberta import (RobertaConfig, RobertaForMaskedLM, RobertaForQuestionAnswering, RobertaForSequenceClassification,
                      RobertaForTokenClassification, RobertaModel, XLMRobertaConfig, XLMRobertaForMaskedLM,
                      XLMRobertaForQuestionAnswering, XLMRobertaForSequenceClassification,
                      XLMRobertaForTokenClassification, XLMRobertaModel)

__all__ = ["BertConfig", "BertModel", "BertModelOutput", "BertPreTrainedModel", "BertForPreTraining",
           "BertForMaskedLM", "BertForNextSentencePrediction", "BertForSequenceClassification",
           "BertForTokenClassification", "BertForQuestionAnswering", "PRESETS", "from_hf", "CLASSES", "MODEL_TYPES",
           "config_from_hf", "model_class", "RobertaConfig", "RobertaModel", "RobertaForMaskedLM",
           "RobertaForSequenceClassification", "RobertaForTokenClassification", "RobertaForQuestionAnswering",
           "XLMRobertaConfig", "XLMRobertaModel", "XLMRobertaForMaskedLM", "XLMRobertaForSequenceClassification",
           "XLMRobertaForTokenClassification", "XLMRobertaForQuestionAnswering", "DistilBertConfig",
           "DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
           "DistilBertForTokenClassification", "DistilBertForQuestionAnswering", "ElectraConfig", "ElectraModel",
           "ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForSequenceClassification",
           "ElectraForTokenClassification", "ElectraForQuestionAnswering"]
