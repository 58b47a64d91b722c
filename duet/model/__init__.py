"""duet's DeepSeek-V3-architecture model core.

    from duet.model import load_model
    model = load_model("path/to/checkpoint", device="cpu", dtype=torch.float32)
    logits = model(input_ids)  # [batch, seq] -> [batch, seq, vocab]
"""

from duet.model.checkpoint import count_parameters, load_config, load_model, save_model
from duet.model.config import ModelArgs
from duet.model.model import CacheView, KVCache, Transformer

__all__ = [
    "CacheView", "KVCache", "ModelArgs", "Transformer",
    "count_parameters", "load_config", "load_model", "save_model",
]
