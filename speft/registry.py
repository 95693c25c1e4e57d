"""One registry for every pluggable component.

A component is one module, one config file and one registry name, the same string everywhere:
``metric=grad`` -> ``conf/metric/grad.yaml`` -> ``speft/salience/grad.py`` ->
``@register("metric", "grad", schema=GradConfig)``.

Registering also stores the component's dataclass schema in Hydra's ConfigStore under
``schema/<group>/<name>``; the YAML option starts with ``defaults: [/schema/<group>/<name>@_here_, _self_]``
so unknown keys and wrong types fail when Hydra composes the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A configuration value is invalid. Raised before any expensive work starts."""


@dataclass(frozen=True)
class Entry:
    group: str
    name: str
    obj: Any
    schema: type | None


_REGISTRY: dict[str, dict[str, Entry]] = {}


def register(group: str, name: str, schema: type | None = None, aliases: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Decorator: register ``obj`` as option ``name`` of config group ``group``.

    ``aliases`` are other names for the same entry (e.g. the reference code's ``gradient`` for ``grad``):
    ``get(group, alias)`` returns the canonical entry (``entry.name`` is the canonical name), ``names``
    lists canonical names only, ``aliases`` maps each alias to its canonical name. Each alias is also the config
    option ``<group>=<alias>``, stored here (it selects the canonical option's file): declared once.
    """

    def deco(obj: Any) -> Any:
        entries = _REGISTRY.setdefault(group, {})
        entry = Entry(group, name, obj, schema)
        for key in (name, *aliases):
            if key in entries and entries[key].obj is not obj:
                raise RuntimeError(f"{group} '{key}' is registered twice")
            entries[key] = entry
        if schema is not None:  # a nested name (glue/rte) becomes Hydra's nested group schema/task/glue
            path, _, leaf = f"schema/{group}/{name}".rpartition("/")
            ConfigStore.instance().store(group=path, name=leaf, node=schema)
        for alias in aliases:  # the option <group>=<alias> is the canonical option, values and all (no YAML file)
            ConfigStore.instance().store(group=group, name=alias, node={"defaults": [name, "_self_"]})
        return obj

    return deco


def names(group: str) -> list[str]:
    """Canonical option names of a group (aliases excluded)."""
    _load_components()
    return sorted(k for k, e in _REGISTRY.get(group, {}).items() if k == e.name)


def aliases(group: str) -> dict[str, str]:
    """Alias -> canonical name, for every alias registered in a group."""
    _load_components()
    return {k: e.name for k, e in sorted(_REGISTRY.get(group, {}).items()) if k != e.name}


def get(group: str, name: str) -> Entry:
    _load_components()
    try:
        return _REGISTRY[group][name]
    except KeyError:
        choices = ", ".join(names(group)) or "(none registered)"
        raise ConfigError(f"Unknown {group} '{name}'. Available: {choices}") from None


def _load_components() -> None:
    # Importing the component packages runs their @register decorators.
    import speft.components  # noqa: F401
