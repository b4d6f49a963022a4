"""The diffusion configs through the trainer's CLI in smoke mode, and their data sets."""

import numpy as np
import pytest

from jaxblocks.train import cli
from jaxblocks.train import config as config_lib
from jaxblocks.train.data import make_datasets


def test_diffusion_digits_data_packs_labels():
    cfg = config_lib.load_config("oms_digits", "smoke")
    train, (xt, yt), k = make_datasets(cfg)
    assert k == 20 and train.x.shape[1:] == (8, 8, 2)
    assert train.x[..., 0].min() >= -1.0 and train.x[..., 0].max() <= 1.0
    np.testing.assert_array_equal(train.x[:, 3, 5, 1], train.y)
    # The negatives: the second half is the first half inverted, labels shifted by 10.
    half = len(xt) // 2
    np.testing.assert_allclose(xt[half:, ..., 0], -xt[:half, ..., 0], atol=1e-6)
    np.testing.assert_array_equal(yt[half:], yt[:half] + 10)


# The same smoke run happens in tests/train/test_configs_smoke.py (through loop.run); this one
# also checks the CLI output and the PNG, at ~40 s of CPU.
@pytest.mark.slow
def test_diffusion_digits_smoke_cli(tmp_path, capsys):
    rc = cli.main(["--config", "diffusion_digits:smoke", "--workdir", str(tmp_path),
                   "progress=False", "plot=False", "tensorboard=False"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "| class | test mean brightness | sample mean brightness |" in out
    assert (tmp_path / "diffusion_samples.png").stat().st_size > 0
    table = (tmp_path / "diffusion_samples.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == 10


@pytest.mark.slow
def test_oms_digits_smoke_cli(tmp_path, capsys):
    rc = cli.main(["--config", "oms_digits:smoke", "--workdir", str(tmp_path),
                   "progress=False", "plot=False", "tensorboard=False"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "[OMS module] 2 steps" in out or "[OMS module] step 2/2" in out
    assert "| mean abs. brightness error |" in out
    assert (tmp_path / "oms_samples.png").stat().st_size > 0
    assert (tmp_path / "variant_0" / "checkpoints" / "2").is_dir()
