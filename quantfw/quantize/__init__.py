"""Weight quantization (offline side of the schemes)."""
