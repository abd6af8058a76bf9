"""Logs a person can read: third-party noise dropped where it is emitted (the line per training
epoch is :class:`dmp_dl.training.progress.EpochLog`).

* :func:`quiet_third_party`: the messages libraries print on every run that tell a user nothing
  (Lightning's advertising tips and device lines, FAISS's SIMD loader, which logs a caught
  ``ModuleNotFoundError`` before it falls back to the next build, a deprecation inside Lightning)
  are filtered at the logger or warning that emits them, by their exact text, so every other
  message of those libraries still comes through.
"""

from __future__ import annotations

import logging
import re
import warnings

# logger -> messages (regular expressions, matched at the start) that carry no information for a user
NOISE = {
    "pytorch_lightning.utilities.rank_zero": (r"💡 Tip:", r"(GPU|TPU|HPU|IPU) available:"),
    "lightning_fabric.utilities.rank_zero": (r"💡 Tip:", r"(GPU|TPU|HPU|IPU) available:"),
}
# third-party warnings (category, message regex) a user can do nothing about
QUIET_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning's pytree helper on torch >= 2.9
    # a small log's epoch has fewer steps than Lightning's step-logging interval: the run logs per epoch (EpochLog)
    (UserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
)


class DropMessages(logging.Filter):
    """A logging filter that drops records whose message starts with one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_third_party() -> None:
    """Install the filters above (idempotent). Call before faiss is first imported: its loader logs
    while the module loads."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded; failures still show
    for name, patterns in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
