"""The networks a bundle can hold: one registry that training, export, loading, warm start, the
propensity model and erasure all read.

A network joins in its own file, with a decorator and a declaration of its tables::

    @register_network(fitter="lightning", encodes_users=True)
    class MatrixFactorization(nn.Module):
        @classmethod
        def vocab_axes(cls) -> dict[str, tuple[str | None, ...]]:
            return {"user.weight": ("user", None), "item.weight": ("item", None)}

What the registry keeps of each (:class:`RegisteredNetwork`):

* ``cls``: the class. A bundle names it by ``cls.__name__`` (``network/network.json``), and
  loading looks that name up here: a class path read from a file is never imported.
* ``fitter``: the fitter that trains it (:mod:`dmp_dl.training.fitters`): ``lightning`` (``model.net`` with
  ``model.module`` in the Lightning loop) or ``auto`` (the automatic model choice). The model's
  YAML declares the same fitter (``model.fitter``); a run whose network declares another is refused.
* ``axes``: ``cls.vocab_axes()``, state_dict key -> the vocabulary of each axis of that tensor
  (``"user"``, ``"item"`` or None), for every table the class may have (absent optional tables
  are skipped). Along a vocabulary axis a table has one row per id, then its own extra rows (the
  unknown user, the padding item). Warm starts copy rows by id along these axes; erasure removes
  a user's row along every ``"user"`` axis, which must hold exactly ``n_users + 1`` rows (the
  last one, the unknown user, is kept).
* ``encodes_users``: whether ``cold_user_vectors(history, tokens, numeric)`` encodes a user from
  their items, so that the propensity model can read the network's user vector.

Every module of :mod:`dmp_dl.models` is imported the first time the registry is read, so a
network there registers by its decorator alone; one defined elsewhere registers when its module
is imported (before a bundle naming it is loaded).

Besides the axes, a network has ``n_users``, ``n_items`` and ``dim``; ``user_vectors(user,
history)`` -> (B, dim) and ``item_vectors(item)`` -> (N, dim), whose dot product is the score; and
a constructor ``cls(n_users=, n_items=, **kwargs)`` where kwargs are its config (and
``user_features``/``item_features`` when it reads attribute tables).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

VOCABS = ("user", "item")

_NETWORKS: dict[str, "RegisteredNetwork"] = {}
_discovered = False


@dataclass(frozen=True)
class RegisteredNetwork:
    """One registered network class and what the package needs to know about it (module docstring)."""

    cls: type
    fitter: str
    encodes_users: bool

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def axes(self) -> dict[str, tuple[str | None, ...]]:
        """state_dict key -> the vocabulary of each axis (``user``, ``item`` or None)."""
        return {str(k): tuple(v) for k, v in self.cls.vocab_axes().items()}

    def tables(self, vocab: str) -> dict[str, int]:
        """state_dict key -> the axis that follows vocabulary ``vocab`` (``user`` or ``item``)."""
        return {key: axes.index(vocab) for key, axes in self.axes.items() if vocab in axes}


def register_network(*, fitter: str, encodes_users: bool) -> Callable[[type], type]:
    """Class decorator: add the network class to the registry (see the module docstring)."""
    if not isinstance(fitter, str) or not fitter:
        raise ValueError(f"fitter must name a fitter of dmp_dl.training.fitters (lightning, auto, ...), got {fitter!r}")

    def add(cls: type) -> type:
        axes = cls.vocab_axes() if callable(getattr(cls, "vocab_axes", None)) else None
        if not isinstance(axes, dict) or any(
                not isinstance(v, tuple) or any(a not in (*VOCABS, None) for a in v) for v in axes.values()):
            raise TypeError(f"{cls.__name__}.vocab_axes() must be a classmethod returning state_dict key -> a tuple of "
                            f"{VOCABS} or None per axis")
        if encodes_users and not callable(getattr(cls, "cold_user_vectors", None)):
            raise TypeError(f"{cls.__name__} has no cold_user_vectors(), so it cannot encode users (encodes_users=False)")
        known = _NETWORKS.get(cls.__name__)
        if known is not None and (known.cls.__module__, known.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"a network named {cls.__name__} is already registered ({known.cls.__module__}); bundles "
                             "name networks by class name, so give this one another name")
        _NETWORKS[cls.__name__] = RegisteredNetwork(cls, fitter, bool(encodes_users))
        return cls

    return add


def unregister_network(cls: type | str) -> None:
    """Remove a network class (or class name) from the registry; nothing when it is not there."""
    _NETWORKS.pop(cls if isinstance(cls, str) else cls.__name__, None)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("dmp_dl.models")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def networks() -> dict[str, RegisteredNetwork]:
    """Class name -> :class:`RegisteredNetwork` of every registered network."""
    _discover()
    return dict(_NETWORKS)


def registered(network: type | str | object) -> RegisteredNetwork | None:
    """The registry entry of a class, a class name or a network instance (None: not registered).

    A class counts only when it is the registered class itself, not another of the same name."""
    _discover()
    if isinstance(network, str):
        return _NETWORKS.get(network)
    cls = network if isinstance(network, type) else type(network)
    entry = _NETWORKS.get(cls.__name__)
    return entry if entry is not None and entry.cls is cls else None


def names() -> str:
    """The registered class names, for messages."""
    return ", ".join(sorted(networks()))
