"""Train embeddings (and the propensity model), evaluate, export the bundle: `python train.py`."""

import hydra
from omegaconf import DictConfig

from dmp_dl.core.cli import prepare_run_config, report_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with report_errors():  # also quiets third-party noise before the libraries load
        from dmp_dl.pipeline.run import run

        run(prepare_run_config(cfg))


if __name__ == "__main__":
    main()
