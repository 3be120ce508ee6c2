"""MoE building blocks: float reference experts module and routing helpers."""

from quantfw.moe.reference import FloatMoE
from quantfw.moe.routing import grouped_topk_sigmoid, softmax_topk

__all__ = ["FloatMoE", "grouped_topk_sigmoid", "softmax_topk"]
