"""``python -m dmp_dl.privacy forget artifacts=DIR user_ids=FILE`` (config: ``conf/privacy_cli.yaml``).

Prints a JSON summary (counts and paths, never an id) and exits 0; a bad bundle, id, file, path or
key is one line on stderr and exit status 2, and then nothing was changed (see
:mod:`dmp_dl.privacy.erasure`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dmp_dl.core.cli import CONF_DIR, report_errors
from dmp_dl.data.id_lists import read_id_file

COMMANDS = ("forget",)
# privacy.erasure_list's default (conf/privacy/default.yaml), relative to the folder a training run starts in
DEFAULT_LIST = Path("privacy_data") / "erased_users.txt"
USAGE = ("usage: python -m dmp_dl.privacy forget artifacts=DIR user_ids=FILE [erasure_list=FILE] [audit_log=FILE] "
         "[secret_env=NAME] [secret_file=FILE]")


def read_user_ids(path: str | Path) -> list[str]:
    """The ids of ``user_ids=FILE``, one per line whatever the file's suffix (no line is ever taken
    for a header and skipped), as :func:`dmp_dl.data.id_lists.read_id_file` reads text: byte-order
    mark, CRLF, blank and ``#`` lines handled."""
    return read_id_file(path, "user_ids", tables=False)


def erasure_list_notice(erasure_list: str | Path) -> str:
    """One line saying where the erasure list is and which later training runs apply it."""
    path = Path(erasure_list).absolute()
    if path.parts[-2:] == DEFAULT_LIST.parts:
        return (f"erasure list: {path}; every later training run started in {path.parents[1]} applies it "
                f"(privacy.erasure_list defaults to {DEFAULT_LIST} there) and drops these users' events; "
                f"a run started elsewhere applies it with privacy.erasure_list={path}")
    return (f"erasure list: {path}; later training runs apply it when given privacy.erasure_list={path} "
            f"(the default is {DEFAULT_LIST} under the folder a run starts in)")


def forget(cfg: DictConfig) -> dict:
    from omegaconf import OmegaConf

    from dmp_dl.core.errors import ConfigError
    from dmp_dl.pipeline.checks import check_privacy_config
    from dmp_dl.privacy.erasure import forget_users  # faiss and the Recommender: after the settings are checked

    for name in ("artifacts", "user_ids"):
        if OmegaConf.is_missing(cfg, name) or not cfg.get(name):
            raise ConfigError(f"{name} is required; {USAGE}")
    check_privacy_config(cfg)  # the id file is a regular file, no setting is NaN
    opt = {k: None if cfg.get(k) is None else str(cfg.get(k)) for k in ("erasure_list", "audit_log", "secret_env", "secret_file")}
    return forget_users(str(cfg.artifacts), read_user_ids(str(cfg.user_ids)), **opt)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="privacy_cli")
def _forget_command(cfg: DictConfig) -> None:
    with report_errors():
        summary = forget(cfg)
        print(json.dumps(summary, indent=1))
        print(erasure_list_notice(summary["erasure_list"]), file=sys.stderr)


def main() -> None:
    """The command line: the subcommand (``forget``) first, then its ``key=value`` settings."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sys.argv.pop(1)
    _forget_command()


if __name__ == "__main__":
    main()
