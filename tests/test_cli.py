"""The command line: a complete run directory, and bad input ending in one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from distsparse.cli import main
from tests.conftest import SMALL

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
SUMMARY_KEYS = {
    "method", "target_sparsity", "sparsity", "layer_density", "test_top1", "world_size",
    "backend", "launcher", "steps", "wall_s", "train_images_per_s", "mask_fingerprint",
    "train_flops_ratio",
}


def _run(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of one command."""
    return _run_with_output(capsys, *argv)[:2]


def _run_with_output(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.err, captured.out


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    status, err, table = _run_with_output(
        capsys, "train", QUICKSTART, *SMALL, "method.name=rigl", f"run.dir={run}"
    )
    assert status == 0, err
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "training.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["method"] == "rigl" and summary["steps"] == 16 and summary["world_size"] == 1
    assert abs(summary["sparsity"] - 0.9) < 1e-3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "mask_update"] == [4, 8, 12]
    resolved = (run / "config.yaml").read_text()
    assert "drop_fraction: 0.3" in resolved and "update_end: 0.75" in resolved
    assert "rigl" in table and str(run) in table


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=magic"], "'method.name' = 'magic'"),
        (["method.sparsity=1.0"], "'method.sparsity' = 1.0"),
        (["method.sparsity=-0.1"], "'method.sparsity' = -0.1"),
        (["method.nonsense=3"], "unknown config key 'method.nonsense'"),
        (["data.name=fashion_mnist", "data.loader=fmnist", "data.path=/nonexistent/fm"], "data.path"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    status, err = _run(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}", *overrides)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("distsparse: error:") and message in err, err
    assert not run.exists()


@pytest.mark.parametrize("place", ["under_a_file", "in_proc"])
def test_a_run_directory_that_cannot_be_made_is_one_line_naming_run_dir(tmp_path, capsys, place):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("kept")
    # /proc refuses new entries even to root, as a read-only file system would.
    run = blocker / "run" if place == "under_a_file" else Path("/proc/distsparse-run/run")
    status, err = _run(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}")
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("distsparse: error: config key 'run.dir'"), err
    assert str(run) in err and "cannot create the run directory" in err
    assert blocker.read_text() == "kept" and not run.exists()


def test_missing_config_file_is_named(tmp_path, capsys):
    status, err = _run(capsys, "train", str(tmp_path / "absent.yaml"))
    assert status == 2 and "absent.yaml does not exist" in err


def test_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}")[0] == 0
    before = _snapshot(run)
    status, err = _run(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}")
    assert status == 2 and "already exists" in err and f"--resume {run}" in err
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert _run(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}", "run.stop_at_step=5")[0] == 0
    checkpoint = run / "checkpoints" / "last.pt"
    if damage == "truncate":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif damage == "garbage":
        checkpoint.write_bytes(b"not a checkpoint at all")
    else:
        checkpoint.unlink()
    before = _snapshot(run)
    status, err = _run(capsys, "train", "--resume", str(run))
    assert status == 2 and str(checkpoint) in err and err.count("\n") == 1, err
    assert _snapshot(run) == before


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}", "run.stop_at_step=5")[0] == 0
    before = _snapshot(run)
    status, err = _run(capsys, "train", QUICKSTART, *SMALL, "method.sparsity=0.8", "--resume", str(run))
    assert status == 2 and "method.sparsity=0.9" in err and "method.sparsity=0.8" in err, err
    assert _snapshot(run) == before


def test_resume_from_the_run_directory_alone_finishes_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", QUICKSTART, *SMALL, f"run.dir={run}", "run.stop_at_step=5")[0] == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
    status, err = _run(capsys, "train", "--resume", str(run))
    assert status == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["completed"]


def test_overrides_after_an_option_still_apply_and_unknown_options_are_named(tmp_path, capsys):
    run = tmp_path / "run"
    status, err = _run(capsys, "train", QUICKSTART, "--nproc", "1", *SMALL, "model.name=mlp",
                       f"run.dir={run}")
    assert status == 0, err
    assert "name: mlp" in (run / "config.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", QUICKSTART, "--nproc", "1", "model.name=mlp", "--bogus"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --bogus")
    status, err, out = _run_with_output(capsys, "compare", str(run), "--out", str(tmp_path / "c"),
                                        str(run))
    assert status == 0, err
    assert (tmp_path / "c" / "compare.csv").read_text().count(str(run)) == 2
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "stray"])
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: stray")
