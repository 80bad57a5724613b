"""Models: Hugging Face classes, registered with the Auto* factories on import."""
from transformers import AutoConfig, AutoModelForCausalLM

from .gpt import AthanorGPT, AthanorGPTConfig

AutoConfig.register(AthanorGPTConfig.model_type, AthanorGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(AthanorGPTConfig, AthanorGPT, exist_ok=True)
# Saved folders also carry the code, so trust_remote_code=True loads them without athanor.
AthanorGPTConfig.register_for_auto_class()
AthanorGPT.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["AthanorGPT", "AthanorGPTConfig"]
