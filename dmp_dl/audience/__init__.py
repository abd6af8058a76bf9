"""The audience layer: interest profiles, segments, lookalike audiences and budgeted targeting.

* :mod:`~dmp_dl.audience.profiles`: time-decayed category and event-type affinities per user;
* :mod:`~dmp_dl.audience.segments`: k-means segments of the user vectors (K by silhouette) and
  their descriptions;
* :mod:`~dmp_dl.audience.lookalike`: seed-list expansion and its offline hold-out quality;
* :mod:`~dmp_dl.audience.targeting`: whom to contact under a budget (and per-segment caps);
* :mod:`~dmp_dl.audience.build` / :mod:`~dmp_dl.audience.bundle`: the training run's step and the
  bundle parts; :mod:`~dmp_dl.audience.jobs`: the command-line jobs (``python -m dmp_dl.audience``).
"""
