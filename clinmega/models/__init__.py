"""Mistral / Mixtral as megatron-core GPTModels: presets, HF config mapping, layer specs, builders.

Names are exported lazily (:mod:`clinmega.utils.lazy`): ``from clinmega.models import get_preset``
does not import megatron-core; ``build_model`` does.
"""

from typing import TYPE_CHECKING

from clinmega.utils.lazy import lazy_exports

_WHERE = {
    "build_model": "clinmega.models.builder", "build_model_chunk": "clinmega.models.builder",
    "transformer_config": "clinmega.models.builder", "check_layout": "clinmega.models.layout",
    "from_hf_config": "clinmega.models.hf", "to_hf_config": "clinmega.models.hf",
    "PRESETS": "clinmega.models.presets", "PUBLISHED_PARAMS": "clinmega.models.presets",
    "count_active_parameters": "clinmega.models.presets", "count_parameters": "clinmega.models.presets",
    "get_preset": "clinmega.models.presets",
    "resolve_transformer_impl": "clinmega.models.spec", "transformer_engine_available": "clinmega.models.spec",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

if TYPE_CHECKING:
    from clinmega.models.builder import build_model, build_model_chunk, transformer_config
    from clinmega.models.hf import from_hf_config, to_hf_config
    from clinmega.models.layout import check_layout
    from clinmega.models.presets import (
        PRESETS,
        PUBLISHED_PARAMS,
        count_active_parameters,
        count_parameters,
        get_preset,
    )
    from clinmega.models.spec import resolve_transformer_impl, transformer_engine_available
