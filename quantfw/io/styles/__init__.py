"""Built-in metadata styles, one module each; each registers itself in `STYLES` (base.py), which
imports them by name on first lookup (base.BUILTIN_STYLES)."""
