"""The method's stages. Each is a plain function from a config and its inputs to a
checkpoint directory (or, for evaluation, result rows); none imports Ray."""
from kdp.stages.aes import load_training_aes, make_training_aes
from kdp.stages.classifier import train_classifier
from kdp.stages.evaluate import evaluate
from kdp.stages.purifier import train_teacher

__all__ = ["train_classifier", "make_training_aes", "load_training_aes", "train_teacher", "evaluate"]
