"""Built-in metadata styles, registered in quantfw.io.metadata.STYLES on import."""

from quantfw.io.styles import compressed_tensors, msmodelslim  # noqa: F401
