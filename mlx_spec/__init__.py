"""mlx_spec: speculative decoding on MLX. Switch from mlx-lm by changing one import."""

from mlx_lm.sample_utils import make_logits_processors  # mlx-lm's own: its processors work here unchanged

from .cache import CachePair, make_prompt_cache
from .discover import find_drafts
from .generate import GenerationResponse, generate, speculative_generate_step, stream_generate
from .load import DraftMetadataWarning, IncompatibleDraftError, check_draft, load
from .prompt_cache import load_prompt_cache, save_prompt_cache
from .sampling import make_sampler
from .stats import GenerationStats

__all__ = [
    "CachePair",
    "DraftMetadataWarning",
    "GenerationResponse",
    "GenerationStats",
    "IncompatibleDraftError",
    "check_draft",
    "find_drafts",
    "generate",
    "load",
    "load_prompt_cache",
    "make_logits_processors",
    "make_prompt_cache",
    "make_sampler",
    "save_prompt_cache",
    "speculative_generate_step",
    "stream_generate",
]
