"""refusal_jax: refusal directions (Arditi et al. 2024) in pure JAX."""

__version__ = "0.1.0"

from refusal_jax.api import evaluate_completions, extract_direction, generate, judge, orthogonalized  # noqa: E402
from refusal_jax.convert.loading import LoadedModel, load_model  # noqa: E402
from refusal_jax.errors import CheckpointError, ChecksumError, ConfigError, DataError, RefusalJaxError, RunError  # noqa: E402
from refusal_jax.evaluation.capabilities import ModelSpec, run_humaneval  # noqa: E402
from refusal_jax.method.selection import Extraction, SelectionSettings  # noqa: E402
from refusal_jax.model.config import ModelConfig, from_hf_config  # noqa: E402
from refusal_jax.model.params import LayerParams, Params  # noqa: E402
from refusal_jax.model.transformer import Intervention, KVCache, Output, forward  # noqa: E402
from refusal_jax.prompts.datasets import DataSettings, sample_sets  # noqa: E402

__all__ = [
    "CheckpointError", "ChecksumError", "ConfigError", "DataError", "DataSettings", "Extraction", "Intervention",
    "KVCache", "LayerParams", "LoadedModel", "ModelConfig", "ModelSpec", "Output", "Params", "RefusalJaxError",
    "RunError", "SelectionSettings", "evaluate_completions", "extract_direction", "forward", "from_hf_config",
    "generate", "judge", "load_model",
    "orthogonalized", "run_humaneval", "sample_sets",
]
