"""`distsparse submit / status / stop` against a real Ray head on 127.0.0.2 whose Python has
distsparse's dependencies but not distsparse, as on a cluster: jobs import the uploaded copy."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.services import skip_or_fail, start_ray_head, stop_ray_head
from tests.test_ddp import EXACT

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"  # relative: inside the uploaded working directory

# Run in a subprocess: importing Ray here would fix RAY_AUTH_MODE before the head exports it.
RAY_MATCHER = """import json, sys
from pathlib import Path
from ray._private.runtime_env.packaging import _get_excludes
from distsparse.orchestrate.jobs import WORKING_DIR_EXCLUDES
excluded = _get_excludes(Path(sys.argv[1]), WORKING_DIR_EXCLUDES)
print(json.dumps([path for path in sys.argv[2:] if excluded(Path(sys.argv[1], path))]))
"""


def _python_without_distsparse(root: Path) -> str:
    """A venv that reaches this one's site-packages by a plain path line, so that their .pth
    files (the editable install of distsparse among them) never run; `ray` starts a head."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(sysconfig.get_path("purelib", "venv", vars={"base": str(root)}))
    ours = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    ray = root / "bin" / "ray"
    ray.write_text(f"#!{python}\nimport sys\nfrom ray.scripts.scripts import main\n"
                   "sys.exit(main())\n")
    ray.chmod(0o755)
    found = subprocess.run([python, "-c", "import importlib.util as u; "
                            "print(u.find_spec('distsparse'), u.find_spec('torch') is not None)"],
                           cwd=root, capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["None", "True"], found.stdout + found.stderr
    return str(python)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """Overrides conftest's: a head (and workers, and job entrypoints) on a Python without
    distsparse, so a job runs only what `submit` uploaded."""
    python = _python_without_distsparse(tmp_path_factory.mktemp("cluster-python"))
    state = tmp_path_factory.mktemp("ray-head")
    head = start_ray_head(state, python)
    try:
        yield head
    finally:
        stop_ray_head(state)


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distsparse.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _wait_for_end(job_id: str, dashboard: str) -> str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = _cli("status", job_id, "--address", dashboard).stdout
        if status.split()[1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end: {status}")


def test_submitted_ray_train_run_succeeds_with_a_complete_run_directory(tmp_path, ray_head):
    run = tmp_path / "submitted"
    result = _cli("submit", CONFIG, *EXACT, "method.name=rigl", f"run.dir={run}",
                  "launcher.name=ray", "launcher.num_workers=2", "--address", ray_head.dashboard,
                  "--follow")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert f"job {job_id} SUCCEEDED" in result.stderr
    assert _cli("status", job_id, "--address", ray_head.dashboard).stdout.split()[:2] == \
        [job_id, "SUCCEEDED"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["launcher"] == "ray" and summary["world_size"] == 2 and summary["completed"]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    kinds = {json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"train", "eval", "mask_update"} <= kinds


def test_a_data_path_missing_on_the_cluster_fails_the_job_with_the_config_error(tmp_path, ray_head):
    """The data path can only be checked where the job runs: the job fails and says why."""
    missing = tmp_path / "no-fashion-mnist"
    result = _cli("submit", CONFIG, "train.max_steps=2", "run.progress=false",
                  f"data.path={missing}", f"run.dir={tmp_path / 'bad'}",
                  "--address", ray_head.dashboard)
    assert result.returncode == 0, result.stderr[-2000:]
    job_id = result.stdout.strip()
    status = _wait_for_end(job_id, ray_head.dashboard)
    assert status.split()[1] == "FAILED", status
    assert f"error: config key 'data.path' = '{missing}'" in status, status
    logs = _cli("status", job_id, "--logs", "--address", ray_head.dashboard).stdout
    assert f"distsparse: error: config key 'data.path' = '{missing}'" in logs


def test_an_invalid_config_is_refused_before_anything_is_submitted(tmp_path, ray_head):
    result = _cli("submit", CONFIG, "method.sparsity=1.5", f"run.dir={tmp_path / 'never'}",
                  "--address", ray_head.dashboard)
    assert result.returncode == 2
    assert result.stderr.strip() == ("distsparse: error: config key 'method.sparsity' = 1.5: "
                                     "expected a value in [0, 1)")
    assert result.stdout == ""
    relative = _cli("submit", CONFIG, "run.name=relative", "--address", ray_head.dashboard)
    assert relative.returncode == 2 and "config key 'run.dir'" in relative.stderr


def test_stop_ends_a_running_job(tmp_path, ray_head):
    result = _cli("submit", CONFIG, *EXACT, "train.epochs=1000", f"run.dir={tmp_path / 'long'}",
                  "--address", ray_head.dashboard)
    job_id = result.stdout.strip()
    deadline = time.monotonic() + 120
    while not (tmp_path / "long" / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.5)
    stopped = _cli("stop", job_id, "--address", ray_head.dashboard)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job_id} stopping"
    assert _wait_for_end(job_id, ray_head.dashboard).split()[1] == "STOPPED"


def test_ray_uploads_the_package_configs_and_launchers_and_leaves_out_outputs_and_data():
    """Ray's own gitignore matcher over WORKING_DIR_EXCLUDES (an unanchored `data` would drop
    distsparse/data/)."""
    if importlib.util.find_spec("ray") is None:
        skip_or_fail("ray is not installed (launch/install.sh installs ray[default,train])")
    kept = sorted(str(path.relative_to(ROOT)) for top in ("distsparse", "configs", "launch")
                  for path in (ROOT / top).rglob("*") if "__pycache__" not in path.parts)
    left_out = ["runs/quickstart/summary.json", "data/fashion-mnist/train-images-idx3-ubyte.gz",
                "data", ".venv/bin/python", "imagenet/train.beton", "benchmarks/out/step.json",
                "distsparse/__pycache__/cli.cpython-311.pyc", ".git/HEAD"]
    assert "distsparse/data/fashion_mnist.py" in kept and "configs/quickstart.yaml" in kept
    result = subprocess.run([sys.executable, "-c", RAY_MATCHER, str(ROOT), "pyproject.toml",
                             *kept, *left_out], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == left_out
