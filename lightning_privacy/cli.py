"""The ``lightning-privacy`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lightning_privacy.dp import ACCOUNTANTS, GaussianSteps, calibrate_noise_multiplier, epsilon_for
from lightning_privacy.errors import LightningPrivacyError


def _epsilon(args: argparse.Namespace) -> str:
    if args.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(
            args.target_epsilon, args.delta, args.sample_rate, args.steps, args.accountant
        )
        eps = epsilon_for([GaussianSteps(sigma, args.sample_rate, args.steps)], args.delta, args.accountant)
        return f"noise_multiplier={sigma:.6g} epsilon={eps:.6g} delta={args.delta:g} accountant={args.accountant}"
    eps = epsilon_for([GaussianSteps(args.noise_multiplier, args.sample_rate, args.steps)], args.delta, args.accountant)
    return f"epsilon={eps:.6g} delta={args.delta:g} accountant={args.accountant}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-privacy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    eps = commands.add_parser(
        "epsilon",
        help="epsilon of DP-SGD for (q, sigma, steps, delta), or sigma for a target epsilon",
        description="Privacy of T steps of the Poisson-subsampled Gaussian mechanism.",
    )
    eps.add_argument("--sample-rate", type=float, required=True, help="q = batch size / dataset size")
    eps.add_argument("--steps", type=int, required=True, help="number of optimizer steps T")
    eps.add_argument("--delta", type=float, required=True)
    sigma = eps.add_mutually_exclusive_group(required=True)
    sigma.add_argument("--noise-multiplier", type=float, help="sigma")
    sigma.add_argument("--target-epsilon", type=float, help="solve for sigma instead")
    eps.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    eps.set_defaults(run=_epsilon)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "epsilon" and not (0 < args.sample_rate <= 1 and args.steps > 0 and 0 < args.delta < 1):
        print("error: need 0 < --sample-rate <= 1, --steps > 0 and 0 < --delta < 1", file=sys.stderr)
        return 2
    try:
        print(args.run(args))
    except LightningPrivacyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
