"""quantfw: declarative quantization of MoE layers."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import quantfw` stays cheap (no Hydra/torch import until used).
    if name == "from_checkpoint":
        from quantfw.api import from_checkpoint

        return from_checkpoint
    raise AttributeError(f"module 'quantfw' has no attribute {name!r}")
