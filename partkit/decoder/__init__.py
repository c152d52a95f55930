"""The part decoder: model, matching losses, training and prediction."""
from .model import DecoderConfig, PartDecoder
from .predict import load_decoder, predict
from .train import TrainConfig, train_decoder

__all__ = ["DecoderConfig", "PartDecoder", "TrainConfig", "train_decoder", "predict", "load_decoder"]
