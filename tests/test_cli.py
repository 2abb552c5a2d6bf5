"""The ``lightning-privacy`` command: answers equal an independently stepped accountant; bad input
is one clean line on stderr and exit code 2, never a traceback, a hang or a meaningless ε."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from lightning_privacy.cli import main

BASE = ["epsilon", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"]


def _opacus(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = create_accountant(accountant)
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_equals_the_reference_accountant(capsys, accountant):
    assert main([*BASE, "--noise-multiplier", "1.1", "--accountant", accountant]) == 0
    out = capsys.readouterr().out
    eps = float(out.split("epsilon=")[1].split()[0])
    assert eps == pytest.approx(_opacus(accountant, 1.1, 0.01, 100, 1e-5), rel=1e-5)  # printed to 6 digits


BAD = [
    [*BASE, "--noise-multiplier", "inf"],
    [*BASE, "--noise-multiplier", "nan"],
    [*BASE, "--noise-multiplier", "-1"],
    [*BASE, "--noise-multiplier", "0"],
    [*BASE, "--noise-multiplier", "1e-9"],
    [*BASE, "--target-epsilon", "inf"],
    [*BASE, "--target-epsilon", "nan"],
    [*BASE, "--target-epsilon", "-2"],
    _replace([*BASE, "--noise-multiplier", "1"], "--delta", "0.5"),
    _replace([*BASE, "--noise-multiplier", "1"], "--delta", "nan"),
    _replace([*BASE, "--noise-multiplier", "1"], "--delta", "1"),
    _replace([*BASE, "--noise-multiplier", "1"], "--sample-rate", "nan"),
    _replace([*BASE, "--noise-multiplier", "1"], "--sample-rate", "1.5"),
    _replace([*BASE, "--noise-multiplier", "1"], "--sample-rate", "0"),
    _replace([*BASE, "--noise-multiplier", "1"], "--steps", "0"),
    _replace([*BASE, "--noise-multiplier", "1"], "--steps", "2.5"),
    [*BASE, "--noise-multiplier", "1", "--accountant", "moments"],
    [*BASE],
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a[1:]) for a in BAD])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in captured.err, captured.err


def test_the_installed_command_refuses_infinity_without_a_traceback():
    exe = Path(sys.executable).with_name("lightning-privacy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_privacy.cli"]
    out = subprocess.run([*cmd, *BASE, "--noise-multiplier", "inf"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "noise_multiplier" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _reference_epsilon(sigma, q, steps, delta):
    return _opacus("rdp", sigma, q, steps, delta)


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("lightning-privacy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_privacy.cli"]


def test_cli_epsilon_matches_the_accountant():
    out = subprocess.run(
        _cli()
        + [
            "epsilon",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "1.1",
            "--steps",
            "500",
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    eps = float(out.split("epsilon=")[1].split()[0])
    assert eps == pytest.approx(_reference_epsilon(1.1, 0.01, 500, 1e-5), rel=1e-5)


def test_cli_target_epsilon_solves_for_sigma():
    out = subprocess.run(
        _cli()
        + [
            "epsilon",
            "--sample-rate",
            "0.01",
            "--target-epsilon",
            "2",
            "--steps",
            "500",
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sigma = float(out.split("noise_multiplier=")[1].split()[0])
    assert 1.95 < _reference_epsilon(sigma, 0.01, 500, 1e-5) <= 2.0


def test_cli_reports_unreachable_targets():
    proc = subprocess.run(
        _cli()
        + [
            "epsilon",
            "--sample-rate",
            "0.9",
            "--target-epsilon",
            "1e-4",
            "--steps",
            "100000",
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "unreachable" in proc.stderr
