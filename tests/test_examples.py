"""The examples in examples/ run, in their short modes, and reach their goals."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import optnet_layer  # noqa: E402


def test_optnet_layer_learns():
    before, after = optnet_layer.run(steps=50, verbose=False)
    assert after < before / 10
