"""HF <-> megatron-core checkpoint conversion for Mistral / Mixtral, streamed tensor by tensor.

``import_hf`` turns a HF folder into a megatron-core distributed checkpoint (torch_dist) loadable
at any TP/PP/EP layout; ``export_hf`` turns such a checkpoint back into a HF folder (a LoRA run's:
merged), ``export_peft_adapter`` a LoRA run's adapters into a HF PEFT folder. They share
the declarative mapping table in :mod:`clinmega.conversion.mapping`. Names are exported lazily
(:mod:`clinmega.utils.lazy`), so ``clinmega.conversion.errors`` imports without torch.
"""

from typing import TYPE_CHECKING

from clinmega.utils.lazy import lazy_exports

_WHERE = {"ConversionError": "clinmega.conversion.errors", "Summary": "clinmega.conversion.progress",
          "export_hf": "clinmega.conversion.exporter", "import_hf": "clinmega.conversion.importer",
          "export_peft_adapter": "clinmega.conversion.lora_export"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

if TYPE_CHECKING:
    from clinmega.conversion.errors import ConversionError
    from clinmega.conversion.exporter import export_hf
    from clinmega.conversion.importer import import_hf
    from clinmega.conversion.lora_export import export_peft_adapter
    from clinmega.conversion.progress import Summary
