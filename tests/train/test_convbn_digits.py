"""The foundation `make train` job (ConvBN ResNet on digits) in a smoke setting."""

import re

import pytest

from jaxblocks.train import convbn_digits


def test_smoke_run_completes_and_beats_chance(capsys):
    # One block per stage: all four strided stages (the receptive field) at half the depth.
    argv = ["--width", "8", "--stage-sizes", "1,1,1,1", "--max-steps", "20"]
    argv += ["--pretrain-epochs", "1", "--tune-epochs", "1"]
    assert convbn_digits.main(argv) == 0
    out = capsys.readouterr().out
    assert "[train mode] epoch 1/1" in out and "[tune mode] epoch 1/1" in out
    final = re.search(r"final: source_accuracy=([\d.]+) transfer_accuracy=([\d.]+)", out)
    assert final, out
    # Five classes: chance is 0.2.
    assert float(final.group(2)) > 0.4, out


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch-size", "0"],
        ["--max-steps", "0"],
        ["--model", "vgg"],
        ["--epochs", "3"],
        ["--stage-sizes", "2,0"],
    ],
)
def test_bad_flags_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        convbn_digits.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err
