"""corral: call OpenAI-compatible APIs at scale, within limits, without losing work."""
