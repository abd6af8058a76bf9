"""Real-time events: journaled durably, applied to the served users at once, replayed on restart
and folded into the next training run (``data.extra_paths=[<journal>]``).

* :class:`LiveRecommender` (``LiveRecommender.load(bundle).ingest(events)``): a bundle plus the
  users events changed (:mod:`dmp_dl.realtime.live`);
* :class:`RealtimeService`: the journal and the live view behind ``serve.py``'s ``POST /events``
  (:mod:`dmp_dl.realtime.service`);
* :mod:`dmp_dl.data.journal`: the journal's files; :mod:`dmp_dl.realtime.intake`: cleaning a
  request's events; :mod:`dmp_dl.realtime.part`: what a bundle stores for exact updates.
"""

from dmp_dl.realtime.live import LiveRecommender
from dmp_dl.realtime.service import RealtimeOptions, RealtimeService, default_journal_dir

__all__ = ["LiveRecommender", "RealtimeOptions", "RealtimeService", "default_journal_dir"]
