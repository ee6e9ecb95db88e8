"""The model presets live in :mod:`clinmega.config.presets` (the config loader expands
``model.preset`` and must not import ``models``); re-exported here, where they are used."""

from clinmega.config.presets import (  # noqa: F401
    PRESETS,
    PUBLISHED_PARAMS,
    count_active_parameters,
    count_parameters,
    get_preset,
)
