"""Answering from a bundle: :class:`~dmp_dl.serving.recommender.Recommender` loads a bundle's parts
and recommends, scores and looks up neighbours. Imports the layers below (models, data, store)."""
