"""Checkpoint converters (installed as `refusal_jax.convert`): Hugging Face safetensors and GGUF -> Params."""
