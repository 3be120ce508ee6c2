"""quantfw: declarative quantization of MoE layers."""
