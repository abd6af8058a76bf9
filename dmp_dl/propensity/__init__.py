"""Propensity: the calibrated probability that a user performs a target event in a coming period.

``train_propensity(cfg, dm, net)`` is the pipeline step; ``save_propensity`` / ``load_propensity``
store it in the artifact bundle; :class:`PropensityScorer` scores known users by vocabulary index
and new users from attributes and recent events.
"""

from dmp_dl.propensity.bundle import load_propensity, save_propensity
from dmp_dl.propensity.scorer import PropensityScorer
from dmp_dl.propensity.train import PropensityResult, train_propensity

__all__ = ["PropensityResult", "PropensityScorer", "load_propensity", "save_propensity", "train_propensity"]
