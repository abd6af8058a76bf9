"""The data layer: sources -> cleaning (with a quality report) -> vocabularies -> splits -> DataModule."""

from dmp_dl.data.cleaning import CleaningOptions, QualityReport, clean_log
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.event_files import EventFileSource
from dmp_dl.data.movielens import MovieLensSource
from dmp_dl.data.schema import EventLog
from dmp_dl.data.split import SplitOptions
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.data.vocab import IdVocab

__all__ = [
    "CleaningOptions", "EventFileSource", "EventLog", "IdVocab", "InteractionDataModule",
    "MovieLensSource", "QualityReport", "SplitOptions", "SyntheticSource", "clean_log",
]
