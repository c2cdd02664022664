"""The built-in demo: a small transformer trained, pruned and recovered with sparse LoRA."""

from .model import TinyLM, TinyLMConfig
from .pipeline import DemoSettings, run_demo

__all__ = ["TinyLM", "TinyLMConfig", "DemoSettings", "run_demo"]
