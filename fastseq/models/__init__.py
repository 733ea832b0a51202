"""Full models built from ``fastseq.nn``, each loading the weights of the library people use."""

from fastseq.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from fastseq.models.clip import CLIP, CLIPConfig
from fastseq.models.gpt import GPT, GPTConfig
from fastseq.models.image_captioning import ImageCaptioner, ImageCaptionerConfig
from fastseq.models.latent_diffusion import LatentDiffusion
from fastseq.models.lstm_lm import LSTMLanguageModel, LSTMLMConfig, detach_state
from fastseq.models.lstm_tagging import LSTMClassifier, LSTMTagger, LSTMTaggingConfig
from fastseq.models.schedulers import DDIMSampler, DDPMSampler, NoiseSchedule
from fastseq.models.sentence_encoder import SentenceEncoder, SentenceEncoderConfig, Vocabulary
from fastseq.models.seq2seq import Seq2Seq, Seq2SeqConfig
from fastseq.models.transformer_seq2seq import TransformerSeq2Seq, TransformerSeq2SeqConfig
from fastseq.models.unet import UNet2DCondition, UNetConfig
from fastseq.models.video_classifier import VideoClassifier, VideoClassifierConfig
from fastseq.models.vit import ViT, ViTConfig
from fastseq.models.word2vec import Word2Vec, Word2VecConfig, Word2VecSampler

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIP",
    "CLIPConfig",
    "DDIMSampler",
    "DDPMSampler",
    "GPT",
    "GPTConfig",
    "ImageCaptioner",
    "ImageCaptionerConfig",
    "LSTMClassifier",
    "LSTMLMConfig",
    "LSTMLanguageModel",
    "LSTMTagger",
    "LSTMTaggingConfig",
    "LatentDiffusion",
    "NoiseSchedule",
    "Seq2Seq",
    "Seq2SeqConfig",
    "SentenceEncoder",
    "SentenceEncoderConfig",
    "TransformerSeq2Seq",
    "TransformerSeq2SeqConfig",
    "UNet2DCondition",
    "UNetConfig",
    "VideoClassifier",
    "VideoClassifierConfig",
    "ViT",
    "ViTConfig",
    "Word2Vec",
    "Word2VecConfig",
    "Word2VecSampler",
    "Vocabulary",
    "detach_state",
]
