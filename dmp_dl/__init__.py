"""dmp_dl: the deep-learning core of a marketing data-management platform."""

__version__ = "0.1.0"
