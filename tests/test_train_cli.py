"""`bfd train` and `bfd make-synthetic` refuse bad requests with exit code 2 and a reason, before any work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from bfd.cli import main  # noqa: E402
from training.synthetic import make_synthetic  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("flat") / "Dataset", layout="flat", patients_per_part=4)


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--weights", "none", "--no-progress", *extra])


def test_mura_split_needs_the_mura_layout(flat_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert _train(flat_data, tmp_path / "run", "--split", "mura") == 2
    assert "training failed" in caplog.text
    assert not (tmp_path / "run" / "router.keras").exists()


def test_epochs_beyond_the_systems_limit_are_refused(flat_data: Path, tmp_path: Path) -> None:
    assert _train(flat_data, tmp_path / "run", "--epochs", "26") == 2
    assert _train(flat_data, tmp_path / "run", "--sensitivity-target", "1.5") == 2


def test_unknown_part_names_what_the_data_holds(
    flat_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert _train(flat_data, tmp_path / "run", "--parts", "wrist") == 2
    assert "elbow" in caplog.text


def test_a_non_empty_run_folder_needs_force(flat_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    assert _train(flat_data, out) == 2
    assert (out / "keep.txt").read_text() == "earlier work"


def test_missing_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    assert _train(tmp_path / "nowhere", tmp_path / "run") == 2
