"""Serve a bundle over HTTP: `python serve.py artifacts=DIR [host=127.0.0.1] [port=8000] [token=...]`."""

import hydra
from omegaconf import DictConfig

from dmp_dl.core.cli import report_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    from dmp_dl.api.server import serve

    with report_errors():
        serve(cfg)


if __name__ == "__main__":
    main()
