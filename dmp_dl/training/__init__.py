"""Training the embedding model: the fitters, model selection, the Lightning run, warm starts and
the bundle export of a finished run. Imports the layers below (models, evaluation, data, store)."""
