"""A run: model + method + tasks -> per-sample records -> a run folder (docs/architecture.md#runs-and-the-results-store).

lmms-eval's `simple_evaluate` drives the tasks with our model object (`VtcbenchLMM`), so the
prompts, splits and metrics are the community's; vtcbench adds the compression, the per-sample
records (visual tokens per layer, timing) and the run folder that makes a run resumable.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtcbench.errors import VtcbenchError
from vtcbench.families import model_facts
from vtcbench.methods import Method, check_before_loading, get_method
from vtcbench.models import load_config, load_model
from vtcbench.profilers.flops import analytic_flops
from vtcbench.provenance import provenance
from vtcbench.results import RunFolder, folder_name
from vtcbench.tasks.registry import LOCAL_PREFIX

if TYPE_CHECKING:
    from vtcbench.tasks import TaskInfo


@dataclass
class RunConfig:
    model: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    seed: int = 0
    batch_size: int = 1
    out: Path = Path("results")
    data_dir: Path | None = None
    random_weights: bool = False
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    overwrite: bool = False
    allow_judge: bool = False
    allow_submission: bool = False
    fidelity: bool = False
    keep_indices: int = 0  # record the kept image tokens of the first N documents per task
    skip_bad_documents: bool = False  # record and leave out documents that cannot be answered, instead of stopping
    budget: str | None = None  # the --budget that chose `params` (a label for reports; the params are the identity)
    device_map: str | dict | None = None  # split the model over devices as it loads (not part of the identity)
    max_memory: dict | None = None
    show_progress: bool = True

    def identity(self, method: Method, lmms_tasks: list[str]) -> dict[str, Any]:
        """What determines the numbers (batch size, device and output folder do not)."""
        return {
            "model": self.model,
            "method": method.name,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in method.params().items()},
            "tasks": lmms_tasks,
            "limit": self.limit,
            "seed": self.seed,
            "random_weights": self.random_weights,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "data_dir": str(self.data_dir.resolve()) if self.data_dir else None,
            "fidelity": self.fidelity,
        }


@dataclass
class RunResult:
    folder: Path
    summary: dict[str, Any]


def check_run(config: RunConfig) -> tuple[Method, list[TaskInfo]]:
    """Every refusal a run makes before it loads weights or writes a folder, once: the method
    and its options against the model's config (`check_before_loading`), the tasks, the data
    folder. Returns the method and the tasks."""
    from vtcbench.tasks import resolve_tasks

    method = get_method(config.method, **config.params)
    check_before_loading(method, load_config(config.model), fidelity=config.fidelity, keep_indices=config.keep_indices)
    infos = resolve_tasks(config.tasks, allow_judge=config.allow_judge, allow_submission=config.allow_submission)
    if config.data_dir is not None and not config.data_dir.is_dir():
        raise VtcbenchError(f"--data-dir {str(config.data_dir)!r} is not a folder")
    return method, infos


def run(config: RunConfig) -> RunResult:
    """Evaluate one method on tasks; resumable; every input checked before anything loads."""
    method, infos = check_run(config)
    with tempfile.TemporaryDirectory(prefix="vtcbench-tasks-") as workdir:  # the include YAMLs, gone after the run
        names, manager = task_names(infos, config.data_dir, Path(workdir))
        return _load_and_evaluate(config, method, names, manager)


def _load_and_evaluate(config: RunConfig, method: Method, names: list[str], manager) -> RunResult:
    if _data_parallel():
        _join_process_group(config)
    model, processor = load_for(config)
    method.check_loaded(model, processor)  # what only the loaded checkpoint shows, before a folder is written
    folder = RunFolder.open(
        config.out, config.identity(method, names), provenance(model, config.device),
        extra={"run_config": {**asdict(config), "out": str(config.out), "data_dir": str(config.data_dir)}},
        overwrite=config.overwrite,
    )
    try:
        task_objects = load_tasks(names, manager)
        results, skipped = _evaluate(model, processor, method, folder, task_objects, manager, config)
    except BaseException:
        folder.discard_if_empty()
        raise
    if results is None:  # a non-zero data-parallel rank: rank 0 writes the summary
        return RunResult(folder=folder.path, summary={})
    summary = summarize(results, folder, method, model, names, skipped)
    if config.budget:
        summary["budget"] = config.budget
    folder.write_summary(summary)
    return RunResult(folder=folder.path, summary=summary)


def load_for(config) -> tuple[Any, Any]:
    """The model and processor a run (or sweep) configuration names."""
    if config.random_weights:
        return load_model(
            config.model, random_weights=True, dtype=config.dtype,
            attn_implementation=config.attn_implementation, device=config.device, seed=config.seed,
            device_map=config.device_map,  # refused there: a dispatch needs a checkpoint
        )
    return load_model(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation, device=config.device,
                      device_map=config.device_map, max_memory=config.max_memory)


def lmms_task_names(infos: list, data_dir: Path | None, workdir: Path) -> list[str]:
    """The lmms-eval task name of each task (a local task's include YAML written in `workdir`)."""
    from vtcbench.tasks import local_task_config, shipped_data

    names: list[str] = []
    for info in infos:
        if info.shipped_yaml is not None:
            names.append(local_task_config(info, shipped_data(info, data_dir), workdir))
        elif data_dir is not None:
            names.append(local_task_config(info, data_dir, workdir))
        else:
            names.append(info.lmms_name)
    return names


def run_folder_name(config: RunConfig) -> str:
    """The name of the run folder `run(config)` writes (under `config.out`), without writing it."""
    method, infos = check_run(config)
    with tempfile.TemporaryDirectory(prefix="vtcbench-tasks-") as workdir:
        names = lmms_task_names(infos, config.data_dir, Path(workdir))
    return folder_name(config.identity(method, names))


def task_names(infos: list, data_dir: Path | None, workdir: Path) -> tuple[list[str], Any]:
    """lmms-eval task names and the TaskManager that knows them.

    With --data-dir every task runs on local data (include YAMLs in `workdir`); without it, hub
    tasks keep their names, and shipped tasks (vtcshapes) still run locally on their default
    data, so a mixed run needs a manager that knows both the work folder and lmms-eval's tasks.
    """
    from vtcbench.tasks import task_manager

    names = lmms_task_names(infos, data_dir, workdir)
    n_local = sum(info.shipped_yaml is not None or data_dir is not None for info in infos)
    if n_local == len(infos):
        return names, task_manager(workdir, include_defaults=False)
    return names, task_manager(workdir) if n_local else task_manager()


def _data_parallel() -> bool:
    """Launched as one of several processes (`torchrun`, `accelerate launch`, `--num-processes`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _join_process_group(config: RunConfig) -> None:
    """One GPU per process (NCCL), or gloo on CPU. Initialised here, not by lmms-eval, whose
    fallback is gloo, which cannot gather the CUDA tensors it then passes."""
    import torch.distributed as dist

    if config.device.startswith("cuda"):
        config.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if config.device_map is not None:
        config.max_memory = replica_max_memory(config.max_memory, int(os.environ.get("LOCAL_RANK", "0")),
                                               int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if config.device.startswith("cuda") else "gloo")


def replica_max_memory(max_memory: dict | None, rank: int, replicas: int) -> dict | None:
    """Data parallelism over split models (`--num-processes P --device-map`): on a node of G GPUs,
    replica `rank` dispatches over its own block of G / P consecutive GPUs (4 GPUs, 2 processes:
    0-1 and 2-3), each at its `--max-memory` limit or, without one, what accelerate finds free;
    the cpu and disk limits apply to every replica (without a cpu limit, each gets its share of
    the free memory). Without GPUs every replica takes the limits as given."""
    import torch
    from accelerate.utils import get_max_memory

    gpus = torch.cuda.device_count()
    if not gpus:
        return max_memory
    if gpus % replicas:
        raise VtcbenchError(f"--num-processes {replicas} cannot split this node's {gpus} GPUs evenly between replicas")
    given = max_memory or {}
    free = get_max_memory()
    share = gpus // replicas
    limits: dict = {key: value for key, value in given.items() if not isinstance(key, int)}
    limits.setdefault("cpu", free["cpu"] // replicas)
    for gpu in range(rank * share, (rank + 1) * share):
        limits[gpu] = given.get(gpu, free[gpu])
    return limits


def load_tasks(names: list[str], manager) -> list:
    """Build lmms-eval's tasks (loading their datasets) before evaluating, so that a dataset that
    cannot be had (offline, no --data-dir) or read (a damaged local file) stops the run with one
    line. lmms-eval retries each load 5 times and then raises tenacity's RetryError."""
    from datasets.exceptions import DatasetGenerationError
    from lmms_eval.tasks import get_task_dict
    from tenacity import RetryError

    try:
        return list(get_task_dict(names, manager).values())
    except (RetryError, OSError, ConnectionError, DatasetGenerationError, ValueError) as error:
        cause = error.last_attempt.exception() if isinstance(error, RetryError) else error
        while isinstance(cause, DatasetGenerationError) and cause.__cause__ is not None:  # the reader's own error
            cause = cause.__cause__
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        local = any(name.startswith(LOCAL_PREFIX) for name in names)
        hint = "check the local files" if local else "offline, point --data-dir at local copies (see the README)"
        raise VtcbenchError(f"the datasets of {', '.join(names)} could not be loaded ({first_line}); {hint}") from error


def task_objects_by_name(task_objects: list) -> dict[str, Any]:
    """lmms-eval's task objects by task name, groups opened (what `get_task_dict` returns)."""
    found: dict[str, Any] = {}
    for entry in task_objects:
        if isinstance(entry, dict):
            found |= task_objects_by_name(list(entry.values()))
        elif entry is not None and hasattr(entry, "config"):
            found[entry.config.task] = entry
    return found


def _evaluate(model, processor, method, folder, task_objects: list, manager, config: RunConfig) -> tuple[dict | None, dict]:
    """lmms-eval's results (None on non-zero data-parallel ranks) and the skipped documents."""
    from vtcbench.lmms_model import VtcbenchLMM

    lm = VtcbenchLMM(
        model, processor, method, folder, batch_size=config.batch_size, show_progress=config.show_progress,
        fidelity=config.fidelity, keep_indices=config.keep_indices, skip_bad_documents=config.skip_bad_documents,
        tasks=task_objects_by_name(task_objects),
    )
    results = evaluate(
        lm, task_objects, manager, folder, limit=config.limit, seed=config.seed, batch_size=config.batch_size,
        log_samples=True,
    )
    skipped = _gathered(lm.skipped)
    if results is not None:
        folder.reload()
        folder.add_sample_metrics(sample_metrics(results))
    return results, skipped


def _gathered(skipped: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
    """Every data-parallel rank's skipped documents (this process's alone when there is one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(skipped)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, skipped)
    return {key: cause for part in parts for key, cause in part.items()}


def sample_metrics(results: dict) -> dict[tuple[str, int], dict]:
    """{(task, doc_id): {metric: value}} from lmms-eval's logged samples: per document, what the
    task's `process_results` returned for each of its metrics (after the task's filters)."""
    metrics: dict[tuple[str, int], dict] = {}
    for task, samples in (results.get("samples") or {}).items():
        names = [key.split(",")[0] for key in results["results"].get(task, {}) if key != "alias" and "_stderr" not in key]
        for sample in samples:
            metrics[(task, int(sample["doc_id"]))] = {name: sample[name] for name in names if name in sample}
    return metrics


def evaluate(lm, task_objects: list, manager, folder: RunFolder, *, limit: int | None, seed: int, batch_size: int,
             log_samples: bool = False) -> dict | None:
    """lmms-eval's `simple_evaluate` with our model object; None on non-zero data-parallel ranks."""
    import argparse

    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=task_objects,
        task_manager=manager,
        distributed_executor_backend="torchrun" if _data_parallel() else "accelerate",
        limit=limit,
        # submission files (e.g. textvqa's) go into the run folder, not the working directory
        # process_with_media=False, lmms-eval's own default: scoring reads the documents without
        # their images (a task whose process_results needs them says so in its YAML), so a skipped
        # document's image is not decoded again
        cli_args=argparse.Namespace(output_path=str(folder.path), process_with_media=False),
        batch_size=batch_size,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        verbosity="ERROR",
    )


def summarize(
    results: dict, folder: RunFolder, method: Method, model, names: list[str], skipped: dict[tuple[str, int], str] | None = None,
) -> dict[str, Any]:
    """Per task: lmms-eval's metrics, mean visual tokens per layer, analytic TFLOPs, timing, and
    the documents left out (`skipped`: {(task, doc_id): cause})."""
    facts = model_facts(model)
    skipped = skipped or {}
    per_task: dict[str, Any] = {}
    for name in names:
        records = [r for r in folder.finished.values() if r["task"] == name]
        metrics = {k: v for k, v in results["results"].get(name, {}).items() if k != "alias"}
        entry: dict[str, Any] = {
            "metrics": metrics,
            "samples": len({r["doc_id"] for r in records}),
            # documents left out by --skip-bad-documents, and why
            "skipped": [{"doc_id": doc_id, "cause": cause} for (task, doc_id), cause in sorted(skipped.items()) if task == name],
        }
        generated = [r for r in records if "prefill_ms" in r]
        counted = [r for r in records if r.get("image_tokens_per_layer")]
        if counted:
            layers = len(counted[0]["image_tokens_per_layer"])
            entry["mean_image_tokens_per_layer"] = [
                statistics.fmean(r["image_tokens_per_layer"][i] for r in counted) for i in range(layers)
            ]
        if generated:
            image_tokens = statistics.fmean(r["image_tokens"] for r in generated)
            text_tokens = statistics.fmean(r["prompt_tokens"] - r["image_tokens"] for r in generated)
            if image_tokens:
                flops = analytic_flops(method, facts, model=folder.identity["model"], image_tokens=round(image_tokens),
                                       text_tokens=max(1, round(text_tokens)),
                                       image_tokens_per_layer=entry.get("mean_image_tokens_per_layer") if _measured_counts(method, facts) else None)
                entry["tflops_image"] = flops.tflops_image
                entry["tflops_total"] = flops.tflops_total
                entry["tflops_method_overhead"] = flops.tflops_method_overhead
            entry["prefill_ms_median"] = statistics.median(r["prefill_ms"] for r in generated)
            per_token = [r["decode_ms"] / (r["new_tokens"] - 1) for r in generated if r["new_tokens"] > 1]
            entry["decode_ms_per_token_median"] = statistics.median(per_token) if per_token else None
            busy_s = sum((r["prefill_ms"] + r["decode_ms"]) / r["batch_size"] for r in generated) / 1000
            entry["samples_per_s"] = len(generated) / busy_s if busy_s else None
            compared = [r for r in generated if "first_token_kl" in r]
            if compared:
                entry["fidelity"] = {
                    "agreement_with_vanilla": statistics.fmean(r["agrees_with_vanilla"] for r in compared),
                    "first_token_kl_mean": statistics.fmean(r["first_token_kl"] for r in compared),
                    "samples": len(compared),
                }
        per_task[name] = entry
    return {"identity": folder.identity, "tasks": per_task}


def _measured_counts(method, facts) -> bool:
    """Whether a run costs the visual tokens its engine applied rather than the method's plan: a
    count set by each image (PruMerge+), or a per-crop selection on AnyRes crops (each image's
    own number of crops)."""
    return bool(method.adaptive) or (method.selects_per_crop and facts.vision_crops > 1)
