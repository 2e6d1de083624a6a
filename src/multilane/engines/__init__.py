"""Engine backends behind two small protocols: generate and embedding."""

from multilane.engines.base import (
    Chunk,
    Completion,
    EmbeddingEngine,
    GenerateEngine,
    Message,
    SamplingOptions,
)

__all__ = ["Chunk", "Completion", "EmbeddingEngine", "GenerateEngine", "Message", "SamplingOptions"]
