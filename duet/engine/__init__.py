"""Text generation on duet's model: batching, streaming, stop strings, MTP speculative decoding."""

from duet.engine.engine import Engine, GenerationResult, load_tokenizer
from duet.engine.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "SamplingParams", "load_tokenizer"]
