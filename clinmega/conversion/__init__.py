"""HF <-> megatron-core checkpoint conversion for Mistral / Mixtral, streamed tensor by tensor.

``import_hf`` turns a HF folder into a megatron-core distributed checkpoint (torch_dist) loadable
at any TP/PP/EP layout; ``export_hf`` turns such a checkpoint back into a HF folder. Both share
the declarative mapping table in :mod:`clinmega.conversion.mapping`.
"""

from clinmega.conversion.errors import ConversionError
from clinmega.conversion.exporter import export_hf
from clinmega.conversion.importer import import_hf
from clinmega.conversion.progress import Summary

__all__ = ["ConversionError", "Summary", "export_hf", "import_hf"]
