"""hetero: run DeepSeek-V2/V3/R1 GGUF models with dense parts on the GPU and experts on the CPU."""

from hetero.errors import HeteroError

__all__ = ["HeteroError", "Model", "load_model"]


def __getattr__(name: str):
    """Model and load_model on first use: importing hetero.model pulls in the planner, which
    itself imports hetero.errors, so an eager import here made `import placement...` circular."""
    if name in ("Model", "load_model"):
        from hetero import model

        return getattr(model, name)
    raise AttributeError(f"module 'hetero' has no attribute {name!r}")
