"""Campaign measurement and uplift targeting: did the campaign work, and whom does a contact change?

* :mod:`~dmp_dl.campaign.control`: holdout control groups, stratified by segment and propensity
  decile (``python -m dmp_dl.audience task=target ... control_frac=0.1``);
* :mod:`~dmp_dl.campaign.outcomes`: reading a campaign's assignments and outcome log;
* :mod:`~dmp_dl.campaign.stats` / :mod:`~dmp_dl.campaign.measure`: lift, intervals, p-values,
  incremental conversions and revenue, per segment and decile (``task=measure``);
* :mod:`~dmp_dl.campaign.features`, :mod:`~dmp_dl.campaign.net`, :mod:`~dmp_dl.campaign.module`,
  :mod:`~dmp_dl.campaign.uplift`: the uplift model learnt from one measured campaign
  (``task=uplift``), evaluated with :mod:`~dmp_dl.campaign.qini` curves;
* :mod:`~dmp_dl.campaign.bundle`: the uplift model as a part of its bundle (``score=uplift``,
  ``POST /uplift``); :mod:`~dmp_dl.campaign.report` / :mod:`~dmp_dl.campaign.jobs`: the reports
  and the command-line jobs.
"""
