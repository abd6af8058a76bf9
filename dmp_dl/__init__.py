"""dmp_dl: the deep-learning core of a marketing data-management platform."""

__version__ = "0.1.0"

__all__ = ["Recommender", "__version__", "fit"]


def __getattr__(name: str):
    # Lazy: `import dmp_dl` stays light; `from dmp_dl import Recommender` loads faiss/scipy on demand.
    if name == "Recommender":
        from dmp_dl.serving.recommender import Recommender

        return Recommender
    if name == "fit":  # train.py on DataFrames (dmp_dl.pipeline.frames); loads torch and Hydra when called for
        from dmp_dl.pipeline.frames import fit

        return fit
    raise AttributeError(f"module 'dmp_dl' has no attribute {name!r}")
