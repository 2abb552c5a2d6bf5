"""LightningCLI: the DP callback and the DP strategies configured from YAML and the command line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_privacy.callbacks import DifferentialPrivacy, DPDDPStrategy

CLI_DIR = Path(__file__).resolve().parents[2] / "examples" / "lightning_cli"


def _load_cli():
    spec = importlib.util.spec_from_file_location("lp_cli_example", CLI_DIR / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_yaml_callback_with_command_line_overrides_trains_within_budget():
    cli = _load_cli().main([
        "fit", "--config", str(CLI_DIR / "config.yaml"),
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks.init_args.target_epsilon=1.0",
        "--trainer.callbacks.init_args.max_epsilon=1.0",
        "--trainer.callbacks.init_args.grad_sample_mode=hooks",
    ])  # fmt: skip
    (dp,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DifferentialPrivacy)]
    assert dp.config.target_epsilon == 1.0 and dp.config.delta == 1e-5  # CLI value, YAML value
    assert dp.engine.grad_sample_mode == "hooks"
    assert 0.9 < dp.epsilon <= 1.0
    assert cli.trainer.logger.experiment.get_run(cli.trainer.logger.run_id).data.params["privacy.delta"] == "1e-05"


def test_yaml_dp_ddp_strategy_is_built_with_its_dp_arguments():
    # Built, not fitted: fitting would re-launch this process per rank (see tests/dp/test_ddp.py).
    from pytorch_lightning.cli import LightningCLI

    module = _load_cli()
    cli = LightningCLI(
        module.DigitsMLP, module.DigitsData, run=False, save_config_callback=None,
        args=["--config", str(CLI_DIR / "dp_ddp.yaml"),
              "--trainer.strategy.init_args.target_epsilon=2.5",
              "--trainer.strategy.init_args.max_physical_batch_size=16"],
    )  # fmt: skip
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DPDDPStrategy)
    assert cli.trainer.world_size == 2
    cfg = strategy.privacy.config
    assert (cfg.target_epsilon, cfg.delta, cfg.max_physical_batch_size) == (2.5, 1e-5, 16)
    assert strategy.process_group_backend == "gloo"


def test_registered_strategy_names():
    from pytorch_lightning.strategies import StrategyRegistry

    assert {"dp", "dp_ddp", "dp_ddp_spawn"} <= set(StrategyRegistry)
