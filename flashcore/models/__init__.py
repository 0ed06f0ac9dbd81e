from .attention_processor import FlashcoreAttnProcessor
from .denoiser import ARCHS, Denoiser, ModelConfig, load_pretrained, save_pretrained

__all__ = ["ARCHS", "Denoiser", "FlashcoreAttnProcessor", "ModelConfig", "load_pretrained", "save_pretrained"]
