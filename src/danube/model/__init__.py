"""The Danube model: config, decoder, attention kernels, generation."""

from danube.model.config import DanubeConfig
from danube.model.transformer import Danube, KVCache, build_model

__all__ = ["Danube", "DanubeConfig", "KVCache", "build_model"]
