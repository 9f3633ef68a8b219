"""Capture: trace a model's per-scale computation into torch.fx graphs with explicit cross-scale state."""
from .capture import CapturedModel, ScaleGraph, capture
from .plan import CapturePlan, ScaleSpec, StateSlot
from .report import CaptureReport
from .tracer import CAPTURE_LOCK, CaptureError, ShapeTracer

__all__ = ["CAPTURE_LOCK", "CaptureError", "CapturePlan", "CaptureReport", "CapturedModel", "ScaleGraph", "ScaleSpec",
           "ShapeTracer", "StateSlot", "capture"]
