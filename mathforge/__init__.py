"""mathforge: math-reasoning LLM checkpoints into fast, measured inference engines."""

__version__ = "0.1.0"
