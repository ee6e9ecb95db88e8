"""Load a stage config: dataclass defaults <- model preset <- YAML files <- ``a.b=c`` overrides.

OmegaConf structured configs do the merging and type checking; this module turns their errors
into :class:`ConfigError` messages that name the key path (and the file, for YAML), and expands
``model.preset: <name>`` into the preset's fields before the user's own values are applied.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig

T = TypeVar("T")
Source = str | Path | Mapping[str, Any]


def _wrap(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "<root>"
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"{key}: {msg} ({where})")


def _read(source: Source) -> DictConfig:
    if isinstance(source, Mapping):
        return OmegaConf.create(dict(source))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors carry line numbers in their text
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(cfg).__name__}")
    return cfg


def _model_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)
            if f.default_factory is ModelConfig or f.type in (ModelConfig, "ModelConfig")]


def _preset_layer(schema: type, layers: list[DictConfig]) -> dict:
    """Values of ``<section>.preset`` (last one wins) expanded into full model sections."""
    from clinmega.config.presets import get_preset

    expanded: dict[str, Any] = {}
    for section in _model_fields(schema):
        name = None
        for layer in layers:
            value = OmegaConf.select(layer, f"{section}.preset", default=None)
            if value is not None:
                name = value
        if name is not None:
            expanded[section] = dataclasses.asdict(get_preset(name))
    return expanded


def _strip_presets(schema: type, layer: DictConfig) -> DictConfig:
    for section in _model_fields(schema):
        node = layer.get(section)
        if isinstance(node, DictConfig) and "preset" in node:
            node.pop("preset")
    return layer


def _layers(sources: Iterable[Source], overrides: Iterable[str]) -> list[tuple[DictConfig, str]]:
    layers: list[tuple[DictConfig, str]] = [(_read(s), str(s) if not isinstance(s, Mapping) else "mapping")
                                            for s in sources]
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
    try:
        dot = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise _wrap(err, "command-line override") from err
    layers.append((dot, "command-line override"))
    return layers


_NOT_SET = object()


def peek(sources: Iterable[Source], overrides: Iterable[str], key: str, default: Any = None) -> Any:
    """The value the user's files and overrides give ``key`` (last one wins), before any schema is
    applied: for decisions that must precede loading (e.g. which checkpoint supplies the model)."""
    value = default
    for layer, _ in _layers(sources, overrides):
        found = OmegaConf.select(layer, key, default=_NOT_SET)
        if found is not _NOT_SET:
            value = OmegaConf.to_object(found) if isinstance(found, DictConfig) else found
    return value


def load_config(schema: type[T], sources: Iterable[Source] = (), overrides: Iterable[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """Build a ``schema`` instance from YAML files / mappings and dotlist overrides.

    ``base`` (e.g. the model a checkpoint records) is applied over the schema defaults and under a
    ``model.preset`` and everything the user gives. Raises :class:`ConfigError` naming the key path
    for unknown keys, wrong types, bad values.
    """
    layers = _layers(sources, overrides)
    merged = OmegaConf.structured(schema)
    presets = _preset_layer(schema, [layer for layer, _ in layers])
    try:
        if base:
            merged = OmegaConf.merge(merged, base)
        merged = OmegaConf.merge(merged, presets)
    except OmegaConfBaseException as err:
        raise _wrap(err, "model preset") from err
    for layer, where in layers:
        try:
            merged = OmegaConf.merge(merged, _strip_presets(schema, layer))
        except OmegaConfBaseException as err:
            raise _wrap(err, where) from err
    try:
        missing = OmegaConf.missing_keys(merged)
        if missing:
            raise ConfigError(f"{sorted(missing)[0]}: required value is missing")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _wrap(err, "validation") from err


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (written next to every run for reproducibility)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
