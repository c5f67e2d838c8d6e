"""The Danube model: config, decoder, attention kernels, generation, and its files (native and Hugging Face) with the one loader.

Nothing here imports from danube outside ``danube.model`` but ``danube.errors`` and ``danube.files``
(tests/test_layout.py): the model knows no Lightning, Hydra, data or tasks.
"""

from danube.model.config import DanubeConfig
from danube.model.transformer import Danube, KVCache, build_model

__all__ = ["Danube", "DanubeConfig", "KVCache", "build_model"]
