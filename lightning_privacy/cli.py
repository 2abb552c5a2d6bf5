"""The ``lightning-privacy`` command."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning_privacy import cli_audit
from lightning_privacy.dp import ACCOUNTANTS, DPConfig, calibrate_noise_multiplier, dp_sgd_event, epsilon_for
from lightning_privacy.errors import LightningPrivacyError, PrivacyConfigError, UnreachableEpsilonError

#: Exit codes: 2 for input the command refuses (as argparse does), 1 for any other error of ours,
#: e.g. a valid target ε that no noise multiplier reaches.
EXIT_BAD_INPUT = 2
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (no usage block), like every other refusal here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _epsilon(args: argparse.Namespace) -> str:
    # The same validation as the training faces: finite, in range, of the right type.
    config = DPConfig(
        noise_multiplier=args.noise_multiplier,
        target_epsilon=args.target_epsilon,
        delta=args.delta,
        steps=args.steps,
        accountant=args.accountant,
    )
    q = args.sample_rate
    if not (math.isfinite(q) and 0 < q <= 1):
        raise PrivacyConfigError(f"--sample-rate must be in (0, 1], got {q}: it is batch size / dataset size.")
    if config.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(config.target_epsilon, config.delta, q, config.steps, config.accountant)
        eps = epsilon_for(dp_sgd_event(sigma, q, config.steps), config.delta, config.accountant)
        return f"noise_multiplier={sigma:.6g} epsilon={eps:.6g} delta={config.delta:g} accountant={config.accountant}"
    eps = epsilon_for(dp_sgd_event(config.noise_multiplier, q, config.steps), config.delta, config.accountant)
    return f"epsilon={eps:.6g} delta={config.delta:g} accountant={config.accountant}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lightning-privacy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    eps = commands.add_parser(
        "epsilon",
        help="epsilon of DP-SGD for (q, sigma, steps, delta), or sigma for a target epsilon",
        description="Privacy of T steps of the Poisson-subsampled Gaussian mechanism.",
    )
    eps.add_argument("--sample-rate", type=float, required=True, help="q = batch size / dataset size")
    eps.add_argument("--steps", type=int, required=True, help="number of optimizer steps T")
    eps.add_argument("--delta", type=float, required=True, help="δ, well below 1 / dataset size")
    sigma = eps.add_mutually_exclusive_group(required=True)
    sigma.add_argument("--noise-multiplier", type=float, help="sigma")
    sigma.add_argument("--target-epsilon", type=float, help="solve for sigma instead")
    eps.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    eps.set_defaults(run=_epsilon)
    cli_audit.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (2: refused input, 1: another error, 0: success)."""
    args = build_parser().parse_args(argv)
    try:
        print(args.run(args))
    except LightningPrivacyError as err:
        refused = isinstance(err, PrivacyConfigError) and not isinstance(err, UnreachableEpsilonError)
        code = EXIT_BAD_INPUT if refused else EXIT_ERROR
        print(f"lightning-privacy {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
