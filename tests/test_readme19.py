"""readme19: README.md read top to bottom as a new user would, each checkable claim run against
the code (experiments/README.md, readme19). One test per drift fixed; each says whether it fails
on main f605938 or is a guard."""

from __future__ import annotations

import re

import pytest
import yaml
from test_train_robust import refused, write_tiny

from hessfree.train.cli import main


@pytest.mark.parametrize(("written", "octal"), [("017", 15), ("0_17", 15)])
def test_readme19_octal_refusal_offers_only_values_the_loader_accepts(
    tmp_path, capsys, written, octal
):
    """README: "`0o17` is text to YAML 1.1, so write `15`". The refusal of `seed: 017` offered
    "or 0o17 for octal", which the same loader then refuses as text (fails on main). Each
    number the message offers must now load as that number (oracle: PyYAML's own reading)."""
    config = write_tiny(tmp_path)
    config.write_text(config.read_text() + f"seed: {written}\n")
    assert yaml.safe_load(f"seed: {written}")["seed"] == octal
    err = refused(["run", str(config), "--check"], capsys)
    offered = re.findall(r"write (-?\d+) without the leading 0 \(or (\S+) for", err)
    assert offered, err
    for value in offered[0]:
        config.write_text(config.read_text().replace(f"seed: {written}", f"seed: {value}"))
        assert main(["run", str(config), "--check"]) == 0, capsys.readouterr().err
        assert f"seed: {int(value)}\n" in capsys.readouterr().out
        config.write_text(config.read_text().replace(f"seed: {value}", f"seed: {written}"))
    assert str(octal) in offered[0]
