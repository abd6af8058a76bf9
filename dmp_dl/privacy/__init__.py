"""Privacy: keyed pseudonyms for user ids, erasure of users from bundles (with an audit trail and
an erasure list that later training honours), and user-level differentially private training.

* :mod:`~dmp_dl.data.pseudonymize`: ``Pseudonymizer`` (HMAC-SHA256, secret from env/file).
* :mod:`~dmp_dl.data.erasure_list`: the list of erased users that loaders honour.
* :mod:`~dmp_dl.privacy.erasure`: ``forget_users`` / ``erase_from_bundle``: remove users from every
  per-user artifact of a bundle, atomically, and audit it.
* :mod:`~dmp_dl.privacy.dp`: DP-SGD for the embedding model and its (ε, δ);
  :mod:`~dmp_dl.privacy.dp_autoencoder`: the same for the default model's autoencoder.
* ``python -m dmp_dl.privacy forget artifacts=DIR user_ids=FILE``: the command line.
"""

from dmp_dl.data.privacy_options import PrivacyOptions
from dmp_dl.data.pseudonymize import Pseudonymizer, load_secret

__all__ = ["PrivacyOptions", "Pseudonymizer", "load_secret"]
