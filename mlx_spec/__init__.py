"""mlx_spec: speculative decoding on MLX. Switch from mlx-lm by changing one import."""

from .cache import CachePair, make_prompt_cache
from .discover import find_drafts
from .generate import GenerationResponse, generate, speculative_generate_step, stream_generate
from .load import IncompatibleDraftError, check_draft, load
from .stats import GenerationStats

__all__ = [
    "CachePair",
    "GenerationResponse",
    "GenerationStats",
    "IncompatibleDraftError",
    "check_draft",
    "find_drafts",
    "generate",
    "load",
    "make_prompt_cache",
    "speculative_generate_step",
    "stream_generate",
]
