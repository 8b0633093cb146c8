"""Job executors: local and Ray give the same ordered results; failures name the job; progress is reported."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from modlora.build.executors import Job, JobError, check_job, run_jobs
from modlora.errors import ModloraError


@dataclasses.dataclass(frozen=True)
class SquareJob(Job):
    value: int
    out_dir: Path | None = None
    tags: tuple[str, ...] = ()


def square(job: SquareJob) -> dict[str, object]:
    """Toy job: square the value; optionally write a marker file (to check side effects)."""
    if job.value < 0:
        raise ValueError(f"negative value {job.value}")
    if job.out_dir is not None:
        (job.out_dir / f"{job.name}.txt").write_text(str(job.value ** 2))
    return {"name": job.name, "square": job.value ** 2, "tags": list(job.tags)}


def visible_gpus(job: SquareJob) -> str | None:
    """Toy job: which GPUs Ray assigned to this task."""
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def make_jobs(values: list[int], out_dir: Path | None = None) -> list[SquareJob]:
    return [SquareJob(name=f"task{v:+d}", value=v, out_dir=out_dir, tags=("t", str(v))) for v in values]


def test_local_runs_in_order_and_reports_progress(tmp_path) -> None:
    jobs = make_jobs([3, 1, 2], tmp_path)
    seen: list[tuple[int, int, str, int]] = []
    results = run_jobs(jobs, square, progress=False,
                       on_result=lambda done, total, job, res: seen.append((done, total, job.name, res["square"])))
    assert [r["square"] for r in results] == [9, 1, 4]
    assert [r["name"] for r in results] == [j.name for j in jobs]
    assert seen == [(1, 3, "task+3", 9), (2, 3, "task+1", 1), (3, 3, "task+2", 4)]
    assert (tmp_path / "task+2.txt").read_text() == "4"
    assert run_jobs([], square, progress=False) == []


def test_local_failure_names_the_job() -> None:
    jobs = make_jobs([1, -5, 2])
    seen: list[int] = []
    with pytest.raises(JobError, match=r"job 'task-5' \(2/3\) failed: ValueError: negative value -5") as info:
        run_jobs(jobs, square, progress=False, on_result=lambda done, *_: seen.append(done))
    assert info.value.job_name == "task-5" and info.value.job_index == 1
    assert isinstance(info.value.__cause__, ValueError)
    assert seen == [1]  # stops at the first failure


def not_plain_job() -> None:
    @dataclasses.dataclass
    class Local:
        name: str

    return Local("x")


def test_jobs_and_functions_are_validated() -> None:
    with pytest.raises(ModloraError, match=r"job\[0\] must be a dataclass"):
        run_jobs([{"name": "a"}], square)
    with pytest.raises(ModloraError, match=r"job 'bad'\.value: object is not plain job data"):
        check_job(SquareJob(name="bad", value=object()), 0)  # type: ignore[arg-type]
    with pytest.raises(ModloraError, match="defined inside a function"):
        check_job(not_plain_job(), 0)
    with pytest.raises(ModloraError, match="module level"):
        run_jobs(make_jobs([1]), lambda job: job.value)
    with pytest.raises(ModloraError, match="unknown executor 'dask'"):
        run_jobs(make_jobs([1]), square, executor="dask")  # type: ignore[arg-type]
    with pytest.raises(ModloraError, match="num_gpus_per_job"):
        run_jobs(make_jobs([1]), square, executor="ray", num_gpus_per_job=-1)


def test_importing_executors_does_not_import_ray() -> None:
    code = "import sys, modlora.build.executors; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_ray_gives_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ModloraError, match=r"pip install modlora\[ray\]"):
        run_jobs(make_jobs([1]), square, executor="ray", progress=False)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_matches_local_and_cleans_up(tmp_path, monkeypatch) -> None:
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # this test module is importable on the workers only because run_jobs passes the driver's sys.path on
    assert not ray.is_initialized()
    values = [5, -0, 7, 2, 9, 4]
    local = run_jobs(make_jobs(values), square, progress=False)
    seen: list[tuple[int, int]] = []
    remote = run_jobs(make_jobs(values, tmp_path), square, executor="ray", num_cpus=2, progress=False,
                      on_result=lambda done, total, job, res: seen.append((done, total)))
    assert remote == local
    assert seen == [(i, len(values)) for i in range(1, len(values) + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{j.name}.txt" for j in make_jobs(values))
    assert not ray.is_initialized()  # the cluster started by run_jobs was shut down

    # a cluster that was already running is reused and left running; failures name the job.
    # It declares one logical GPU, so num_gpus_per_job="auto" must request it (no real GPU needed).
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    try:
        with pytest.raises(JobError, match=r"job 'task-3' \(2/3\) failed on Ray: ValueError: negative value -3") as info:
            run_jobs(make_jobs([1, -3, 2]), square, executor="ray", progress=False)
        assert info.value.job_name == "task-3"
        assert ray.is_initialized()
        assert run_jobs(make_jobs([6]), square, executor="ray", num_gpus_per_job=0, progress=False)[0]["square"] == 36
        assert run_jobs(make_jobs([1, 2, 3]), visible_gpus, executor="ray", progress=False) == ["0", "0", "0"]
        assert run_jobs(make_jobs([1]), visible_gpus, executor="ray", num_gpus_per_job=0, progress=False) != ["0"]
        # a function the workers cannot import gets a hint
        (tmp_path / "driver_only_jobs.py").write_text("def double(job):\n    return 2 * job.value\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        from driver_only_jobs import double

        assert run_jobs(make_jobs([4]), double, progress=False) == [8]
        with pytest.raises(JobError, match="must be importable on every Ray worker"):
            run_jobs(make_jobs([4]), double, executor="ray", progress=False)
    finally:
        ray.shutdown()
