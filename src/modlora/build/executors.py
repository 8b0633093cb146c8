"""Run a list of independent jobs (e.g. "train the expert for task t") locally or on a Ray cluster.

A *job* is plain data: a dataclass whose fields are ``str`` / ``int`` / ``float`` / ``bool`` / ``None`` /
paths, or lists, tuples, dicts and dataclasses of those. ``fn(job) -> result`` must be a module-level
function, so that Ray workers import it by name instead of shipping code. ``run_jobs`` returns the
results in job order, whichever executor ran them.

Ray is optional: this module imports it only when ``executor="ray"`` is requested.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any, Literal, TypeVar

from modlora.errors import ModloraError

J = TypeVar("J")
R = TypeVar("R")

Executor = Literal["local", "ray"]
ProgressCallback = Callable[[int, int, Any, Any], None]
"""``callback(done, total, job, result)``, called on the driver after each job finishes."""

RAY_INSTALL_HINT = "pip install modlora[ray]"
_PLAIN_SCALARS = (str, int, float, bool, type(None), PurePath, enum.Enum)


class JobError(ModloraError):
    """A job raised; ``job_name``, ``job_index`` and the original exception (``__cause__``) are kept."""

    def __init__(self, message: str, *, job_name: str, job_index: int) -> None:
        super().__init__(message)
        self.job_name = job_name
        self.job_index = job_index


@dataclasses.dataclass(frozen=True)
class Job:
    """Convenience base class for jobs: subclasses add their own plain-data fields after ``name``."""

    name: str


def job_name(job: Any, index: int) -> str:
    """The job's ``name`` field when it has one, else ``job[index]``."""
    name = getattr(job, "name", None)
    return name if isinstance(name, str) and name else f"job[{index}]"


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    if depth > 16:
        raise ModloraError(f"{where}: nested too deeply to be plain job data")
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple, frozenset, set)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ModloraError(f"{where}: dict key {key!r} must be a str or int")
            _check_plain(item, f"{where}[{key!r}]", depth + 1)
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        _check_importable_class(type(value), where)
        for f in dataclasses.fields(value):
            _check_plain(getattr(value, f.name), f"{where}.{f.name}", depth + 1)
        return
    raise ModloraError(f"{where}: {type(value).__name__} is not plain job data (use str/int/float/bool/paths, "
                       "lists, dicts or dataclasses of those)")


def _check_importable_class(cls: type, where: str) -> None:
    if "<locals>" in cls.__qualname__:
        raise ModloraError(f"{where}: job class {cls.__qualname__} is defined inside a function; define it at "
                           "module level so that workers can import it")


def check_job(job: Any, index: int) -> None:
    """Raise :class:`ModloraError` unless ``job`` is a dataclass instance holding plain data only."""
    if not dataclasses.is_dataclass(job) or isinstance(job, type):
        raise ModloraError(f"job[{index}] must be a dataclass instance of plain data, got {type(job).__name__}")
    _check_plain(job, f"job {job_name(job, index)!r}")


def check_job_function(fn: Callable[..., Any]) -> None:
    """Raise :class:`ModloraError` unless ``fn`` is a callable that workers can import by name."""
    if not callable(fn):
        raise ModloraError(f"job function must be callable, got {type(fn).__name__}")
    qualname = getattr(fn, "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise ModloraError(f"job function {qualname!r} must be defined at module level (no lambdas or nested "
                           "functions), so that Ray workers can import it")


def _call_job(fn: Callable[[Any], Any], job: Any) -> Any:
    """What each Ray task runs (module-level so that workers import it)."""
    return fn(job)


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_jobs(jobs: Sequence[J], fn: Callable[[J], R], executor: Executor = "local", *, ray_address: str | None = None,
             num_gpus_per_job: float | Literal["auto"] = "auto", num_cpus: int | None = None, desc: str = "jobs",
             progress: bool = True, on_result: ProgressCallback | None = None, max_retries: int = 0) -> list[R]:
    """Run ``fn(job)`` for every job; return the results in job order.

    ``executor="local"``: sequentially in this process, with a tqdm progress bar.
    ``executor="ray"``: one Ray task per job (``num_cpus=1``, ``num_gpus=num_gpus_per_job``; ``"auto"`` means 1
    when the cluster has GPUs, else 0). Ray is initialised if needed: ``ray.init(address=ray_address)`` when an
    address is given (or ``RAY_ADDRESS`` is set), otherwise a fresh local cluster with ``num_cpus`` CPUs
    (default: all) whose workers get the driver's ``sys.path``; a cluster started here is shut down before
    returning. On an existing cluster, ``fn`` and the job classes must be importable on the workers. ``max_retries`` re-runs tasks whose
    worker died (not tasks that raised).

    The first failing job stops the run (remaining Ray tasks are cancelled) and raises :class:`JobError`
    naming the job, chained to the original exception. ``on_result(done, total, job, result)`` is called on
    the driver after each job finishes.
    """
    jobs = list(jobs)
    for i, job in enumerate(jobs):
        check_job(job, i)
    check_job_function(fn)
    if executor == "local":
        return _run_local(jobs, fn, desc=desc, progress=progress, on_result=on_result)
    if executor == "ray":
        if num_gpus_per_job != "auto" and (isinstance(num_gpus_per_job, bool)
                                           or not isinstance(num_gpus_per_job, (int, float))
                                           or num_gpus_per_job < 0):
            raise ModloraError(f"num_gpus_per_job must be 'auto' or a non-negative number, got {num_gpus_per_job!r}")
        if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
            raise ModloraError(f"num_cpus must be a positive integer, got {num_cpus!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ModloraError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        return _run_ray(jobs, fn, ray_address=ray_address, num_gpus_per_job=num_gpus_per_job, num_cpus=num_cpus,
                        desc=desc, progress=progress, on_result=on_result, max_retries=max_retries)
    raise ModloraError(f"unknown executor {executor!r}; expected 'local' or 'ray'")


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from modlora.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="job", enabled=enabled, leave=True)


def _run_local(jobs: list[J], fn: Callable[[J], R], *, desc: str, progress: bool,
               on_result: ProgressCallback | None) -> list[R]:
    results: list[R] = []
    with _progress_bar(len(jobs), desc, progress) as bar:
        for i, job in enumerate(jobs):
            name = job_name(job, i)
            bar.set_postfix_str(name, refresh=False)
            try:
                result = fn(job)
            except Exception as exc:
                raise JobError(f"job {name!r} ({i + 1}/{len(jobs)}) failed: {_describe_failure(exc)}",
                               job_name=name, job_index=i) from exc
            results.append(result)
            bar.update(1)
            if on_result is not None:
                on_result(i + 1, len(jobs), job, result)
    return results


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModloraError(f"executor='ray' needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


def _init_ray(ray: Any, ray_address: str | None, num_cpus: int | None) -> bool:
    """Connect to or start Ray unless already initialised; returns whether this call started it."""
    if ray.is_initialized():
        return False
    try:
        if ray_address is not None:
            ray.init(address=ray_address, include_dashboard=False)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(include_dashboard=False)
        else:
            # workers of a local cluster see the driver's sys.path, so fn and job classes import as on the driver
            driver_path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": driver_path}})
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError ... from ray.init
        target = ray_address or os.environ.get("RAY_ADDRESS") or "a local cluster"
        raise ModloraError(f"cannot start or connect to Ray at {target}: {_describe_failure(exc)}") from exc
    return True


def _run_ray(jobs: list[J], fn: Callable[[J], R], *, ray_address: str | None, num_gpus_per_job: float | str,
             num_cpus: int | None, desc: str, progress: bool, on_result: ProgressCallback | None,
             max_retries: int) -> list[R]:
    ray = _import_ray()
    started_here = _init_ray(ray, ray_address, num_cpus)
    try:
        if num_gpus_per_job == "auto":
            num_gpus_per_job = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        remote_call = ray.remote(num_cpus=1, num_gpus=num_gpus_per_job, max_retries=max_retries)(_call_job)
        fn_ref = ray.put(fn)
        index_of = {remote_call.remote(fn_ref, job): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        pending = list(index_of)
        done = 0
        try:
            with _progress_bar(len(jobs), desc, progress) as bar:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    for ref in ready:
                        i = index_of[ref]
                        try:
                            results[i] = ray.get(ref)
                        except Exception as exc:
                            raise _ray_job_error(exc, jobs, i) from exc
                        done += 1
                        bar.set_postfix_str(job_name(jobs[i], i), refresh=False)
                        bar.update(1)
                        if on_result is not None:
                            on_result(done, len(jobs), jobs[i], results[i])
        except BaseException:  # a failed job, a failing callback or Ctrl-C: stop the rest
            _cancel(ray, pending)
            raise
        return results
    finally:
        if started_here:
            ray.shutdown()


def _ray_job_error(exc: Exception, jobs: Sequence[Any], index: int) -> JobError:
    cause = getattr(exc, "cause", None)  # RayTaskError keeps the exception raised inside the task
    original = cause if isinstance(cause, BaseException) else exc
    name = job_name(jobs[index], index)
    hint = ("; the job function and job classes must be importable on every Ray worker "
            "(define them in an installed module)" if "No module named" in str(original) else "")
    return JobError(f"job {name!r} ({index + 1}/{len(jobs)}) failed on Ray: {_describe_failure(original)}{hint}",
                    job_name=name, job_index=index)


def _cancel(ray: Any, refs: list[Any]) -> None:
    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception:  # best effort: a task may have finished meanwhile
            pass
