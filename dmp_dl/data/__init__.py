"""The data layer: sources -> cleaning (with a quality report) -> vocabularies -> splits -> DataModule.

The names below load on first use: importing a light module of this package (``dmp_dl.data.schema``
for serving) must not import the DataModule and with it PyTorch Lightning.
"""

import importlib

_EXPORTS = {
    "CleaningOptions": "cleaning", "QualityReport": "cleaning", "clean_log": "cleaning",
    "InteractionDataModule": "datamodule", "EventFileSource": "event_files", "MovieLensSource": "movielens",
    "EventLog": "schema", "SplitOptions": "split", "SyntheticSource": "synthetic", "IdVocab": "vocab",
}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dmp_dl.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dmp_dl.data' has no attribute {name!r}")
