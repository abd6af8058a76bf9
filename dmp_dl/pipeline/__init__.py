"""The training run as stages (:mod:`~dmp_dl.pipeline.run`), the checks every command runs first
(:mod:`~dmp_dl.pipeline.checks`) and the Hydra callback that runs them (:mod:`~dmp_dl.pipeline.preflight`)."""
