"""Dict-valued settings that take new keys from the command line as documented.

Hydra closes the composed config (struct mode) before it applies the command-line overrides, so a
dict setting holds only the keys its YAML lists: ``data.source.columns={user_id: userId}`` or
``data.cleaning.event_weights.signup=1.0`` would be refused ("Key 'user_id' is not in struct") and
only the ``+`` form would work. The dicts below are the settings whose keys are the user's (column
names, event types): each is registered here as a small config whose node is marked open, and the
config group that defines the setting lists it in its defaults (``/open_settings/<name>@_here_``),
so the node keeps that mark through composition while the rest of the config stays closed (a
misspelt ordinary key is still refused). A dict override merges into the listed keys
(``event_weights={signup: 1.0}`` adds ``signup``); ``~key`` then ``+key={...}`` replaces the dict.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

GROUP = "open_settings"
# config name -> the dict settings, relative to where that config is placed (``@_here_``).
OPEN_DICTS: dict[str, tuple[str, ...]] = {
    "data_events": ("source.columns", "cleaning.event_weights"),  # conf/data/events.yaml
    "data_cleaning": ("cleaning.event_weights",),  # conf/data/movielens.yaml, synthetic.yaml
    "audience_cli": ("outcome_columns",),  # conf/audience_cli.yaml
}


def open_node(keys: tuple[str, ...]) -> DictConfig:
    """A config holding an empty, open dict at each dotted key of ``keys``."""
    node = OmegaConf.create()
    for key in keys:
        OmegaConf.update(node, key, {}, force_add=True)
        OmegaConf.select(node, key)._set_flag("struct", False)
    return node


def register() -> None:
    """Store every config of :data:`OPEN_DICTS` in Hydra's config store (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, keys in OPEN_DICTS.items():
        store.store(group=GROUP, name=name, node=open_node(keys), provider="dmp_dl")
