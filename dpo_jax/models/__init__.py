"""Models: the Llama / Qwen2 / Mistral decoder, its config, and Hugging Face import/export."""
from dpo_jax.models.config import TINY, ModelConfig
from dpo_jax.models.llama import Decoder, init_cache
from dpo_jax.models.core import (abstract_params, init_params, logical_axes, merge, split)
