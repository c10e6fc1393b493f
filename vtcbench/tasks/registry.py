"""Benchmark registry over lmms-eval 0.7.3 tasks, and offline (local) datasets for them.

Short names (docs/architecture.md#benchmarks-and-tasks) map to lmms-eval task names; any other name lmms-eval's
TaskManager knows passes through. Tasks whose score needs an LLM judge or a submission to an
evaluation server are refused unless the user opts in (`--allow-judge`, `--allow-submission`).

What the flags of the short names rest on (read from the task YAMLs and utils of lmms-eval 0.7.3):

- needs_judge: only `mmbench_en_dev` (mmb). Its `gpt_eval_score` aggregation
  (`mmbench/en_utils.py::mmbench_aggregate_dev_results_eval`) runs `MMBench_Evaluator.eval_result(
  eval_method="openai")`: a rule (`can_infer`) reads the option letter, and every answer it cannot
  parse goes to a GPT model over `OPENAI_API_URL` / `OPENAI_API_KEY` (5 attempts x 3 s sleep, 3
  retries, then a random letter). lmms-eval ships a judge-free variant, `mmbench_en_dev_static`
  (regex MCQ extraction). No other short-name task imports an API client or `lmms_eval.llm_judge`.
- needs_submission: none. Every short name points at a split with local answers (val / dev /
  testdev / test-with-answers). `textvqa_val` also writes a submission file as a side metric, and
  `mmbench_en_dev` an xlsx, but both score locally. The server-scored ones are the `*_test` tasks
  (`textvqa_test`, `docvqa_test`, `vqav2_test`, `vizwiz_vqa_test`, `infovqa_test`,
  `mmbench_en_test`), whose only metric is `submission`.

Pass-through names get their flags from their YAML (see `_flags_from_yaml`).

Shipped tasks (`TaskInfo.shipped_yaml`, today vtcshapes and vtcshapes_mc): the YAML lives in this
package, not in lmms-eval, and always runs on local data through `local_task_config`; `shipped_data`
says where. A task that reads another task's data names it in `TaskInfo.data` (vtcshapes_mc reads
vtcshapes'), which is then also looked for.

Offline data (`local_task_config`): an include YAML in a work folder `include:`s the shipped YAML
by absolute path and replaces `dataset_path` / `dataset_name` / `dataset_kwargs`, which is how
lmms-eval's `ConfigurableTask.download` reads local data:
  - parquet: `dataset_path: parquet`, `dataset_kwargs: {data_files: {<split>: [files]}}`
    -> `datasets.load_dataset("parquet", name=None, data_files=...)`;
  - a `Dataset.save_to_disk` folder: `dataset_path: arrow` with its arrow files (same builder path);
  - a `DatasetDict.save_to_disk` folder: `dataset_path: <folder>`, `dataset_kwargs: {load_from_disk:
    True}` -> `datasets.load_from_disk(<folder>)`, which must hold the task's split.
`include:` merges top-level keys only (`dict.update`), so the new `dataset_kwargs` drops the hub
ones (`token: True`), and `dataset_name: null` drops the hub config name. `lmms_eval_specific_kwargs`,
`test_split`, prompts and metrics come unchanged from the shipped YAML.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtcbench.errors import VtcbenchError
from vtcbench.tasks.local_images import image_casts

LOCAL_PREFIX = "vtc_local_"


@dataclass(frozen=True)
class TaskInfo:
    short: str
    lmms_name: str
    description: str
    needs_judge: bool = False
    needs_submission: bool = False
    shipped_yaml: str | None = None  # a YAML shipped with vtcbench, relative to vtcbench/tasks
    data: str | None = None  # the name its offline data goes by, when not its own (after its own names)


SHIPPED_DIR = Path(__file__).resolve().parent


TASKS: dict[str, TaskInfo] = {
    info.short: info
    for info in (
        TaskInfo("gqa", "gqa", "GQA testdev-balanced: compositional questions on real images; exact match"),
        TaskInfo("textvqa", "textvqa_val", "TextVQA val: questions that need reading text in the image; VQA accuracy over 10 answers"),
        TaskInfo("pope", "pope", "POPE: yes/no object-hallucination probes (adversarial, popular, random); accuracy, F1, yes-ratio"),
        TaskInfo("mme", "mme", "MME: yes/no question pairs in 14 subtasks; perception and cognition scores (acc + acc+)"),
        TaskInfo("docvqa", "docvqa_val", "DocVQA val: questions on document images; ANLS"),
        TaskInfo("sqa", "scienceqa_img", "ScienceQA-IMG test: science multiple choice with an image; option-letter exact match"),
        TaskInfo(
            "mmb", "mmbench_en_dev",
            "MMBench-EN dev: multiple choice; answers the rules cannot parse go to a GPT judge "
            "(OPENAI_API_KEY); judge-free variant: mmbench_en_dev_static",
            needs_judge=True,
        ),
        TaskInfo("seed", "seedbench", "SEED-Bench: multiple choice on images and video frames; accuracy per data type"),
        TaskInfo("mmstar", "mmstar", "MMStar val: vision-indispensable multiple choice; accuracy in 6 capabilities"),
        TaskInfo("ai2d", "ai2d", "AI2D test: science-diagram multiple choice; exact match of the extracted letter"),
        TaskInfo("chartqa", "chartqa", "ChartQA test: questions on charts; relaxed accuracy (5% numeric tolerance)"),
        TaskInfo("vqav2", "vqav2_val", "VQAv2 val: open questions on COCO images; VQA accuracy"),
        TaskInfo("vizwiz", "vizwiz_vqa_val", "VizWiz-VQA val: photos taken by blind people, may be unanswerable; VQA accuracy"),
        TaskInfo("infovqa", "infovqa_val", "InfographicVQA val: questions on infographics; ANLS"),
        TaskInfo(
            "vtcshapes", "vtcshapes",
            "vtcshapes (vtcbench's own, offline): color / presence / count / text questions on procedural "
            "scenes; exact match per family and overall",
            shipped_yaml="vtcshapes/vtcshapes.yaml",
        ),
        TaskInfo(
            "vtcshapes_mc", "vtcshapes_mc",
            "vtcshapes as multiple choice (offline): the family's answers ranked by log-likelihood; accuracy",
            shipped_yaml="vtcshapes/vtcshapes_mc.yaml", data="vtcshapes",
        ),
    )
}
_BY_LMMS = {info.lmms_name: info for info in TASKS.values()}

# Shipped YAML of each short-name task, relative to lmms_eval/tasks (found without the slow index).
_YAML = {
    "gqa": "gqa/gqa.yaml",
    "textvqa_val": "textvqa/textvqa_val.yaml",
    "pope": "pope/pope.yaml",
    "mme": "mme/mme.yaml",
    "docvqa_val": "docvqa/docvqa_val.yaml",
    "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "mmbench_en_dev": "mmbench/mmbench_en_dev.yaml",
    "seedbench": "seedbench/seedbench.yaml",
    "mmstar": "mmstar/mmstar.yaml",
    "ai2d": "ai2d/ai2d.yaml",
    "chartqa": "chartqa/chartqa.yaml",
    "vqav2_val": "vqav2/vqav2_val.yaml",
    "vizwiz_vqa_val": "vizwiz_vqa/vizwiz_vqa_val.yaml",
    "infovqa_val": "infovqa/infovqa_val.yaml",
}

# Columns the task's doc_to_visual / doc_to_text / doc_to_target / process_results read, checked
# before lmms-eval loads the data (its loader retries failures for up to a minute, then raises a
# tenacity.RetryError). GQA's `image` comes from the images config (see offline_gqa).
REQUIRED_COLUMNS = {
    "gqa": ("question", "answer", "imageId"),
    "textvqa_val": ("question", "answers", "question_id", "image"),
    "pope": ("question", "answer", "question_id", "image"),
    "mme": ("question", "answer", "category", "question_id", "image"),
    "docvqa_val": ("question", "answers", "image"),
    "vtcshapes": ("question_id", "image", "question", "answer", "family"),
    "vtcshapes_mc": ("question_id", "image", "question", "answer", "family"),
}

_JUDGE_WORDS = re.compile(r"gpt|judge|llm_as", re.IGNORECASE)
_JUDGE_SOURCE = re.compile(r"llm_judge|OPENAI_API_KEY|API_KEY|openai|get_chat_response|gpt", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# lmms-eval's task index


def lmms_tasks_dir() -> Path:
    """lmms_eval/tasks of the installed package, found without importing lmms_eval."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise VtcbenchError("lmms-eval is not installed; install vtcbench's dependencies (see README)")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


@functools.lru_cache(maxsize=1)
def _default_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager()


@functools.lru_cache(maxsize=1)
def _including_manager_class():
    from lmms_eval.tasks import TaskManager

    class IncludingTaskManager(TaskManager):
        """TaskManager(include_path=...) that reuses the cached index of lmms-eval's own tasks."""

        def initialize_tasks(self, include_path=None, include_defaults=True):
            index = copy.deepcopy(_default_manager().task_index) if include_defaults else {}
            for path in [include_path] if isinstance(include_path, str) else include_path or []:
                index = {**self._get_task_and_group(path), **index}  # lmms-eval's precedence
            return index

    return IncludingTaskManager


def task_manager(include_path: str | Path | None = None, *, include_defaults: bool = True):
    """An lmms-eval TaskManager; with `include_path`, it also knows the YAMLs in that folder.

    Building lmms-eval's index of its ~2000 tasks takes seconds, so it is built once per process.
    `include_defaults=False` gives a manager that knows only the folder (enough for local tasks,
    whose YAMLs include the shipped ones by absolute path).
    """
    if include_path is None:
        return _default_manager()
    if include_defaults:
        return _including_manager_class()(include_path=str(include_path))
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path), include_defaults=False)


# --------------------------------------------------------------------------------------------
# resolving names


def resolve_tasks(
    names: list[str],
    *,
    allow_judge: bool = False,
    allow_submission: bool = False,
    task_manager=None,
) -> list[TaskInfo]:
    """Short names and lmms-eval task names -> TaskInfo, in order, without duplicates.

    Short names (and the lmms-eval names of the short-name tasks) need no TaskManager; any other
    name is looked up in `task_manager` (default: lmms-eval's own index, built once).
    """
    infos: list[TaskInfo] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        info = TASKS.get(name) or _BY_LMMS.get(name)
        if info is None:
            manager = task_manager if task_manager is not None else _default_manager()
            info = _pass_through(name, manager)
        if info.needs_judge and not allow_judge:
            raise VtcbenchError(
                f"task {name!r} ({info.lmms_name}) is scored by an LLM judge (needs an API key and sends "
                f"answers to it); pass --allow-judge to run it"
            )
        if info.needs_submission and not allow_submission:
            raise VtcbenchError(
                f"task {name!r} ({info.lmms_name}) has no local answers: its score comes from submitting "
                f"predictions to an evaluation server; pass --allow-submission to run it"
            )
        if all(existing.lmms_name != info.lmms_name for existing in infos):
            infos.append(info)
    if not infos:
        raise VtcbenchError("no tasks given; see `vtcbench tasks`")
    return infos


def _pass_through(name: str, manager) -> TaskInfo:
    index = manager.task_index
    if name not in index:
        known = list(dict.fromkeys([*TASKS, *index]))
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VtcbenchError(f"unknown task {name!r}: neither a vtcbench short name nor an lmms-eval task{hint} (see `vtcbench tasks`)")
    judge, submission = _flags(name, manager)
    kind = index[name]["type"]
    return TaskInfo(name, name, f"lmms-eval {kind} {name}", needs_judge=judge, needs_submission=submission)


def _flags(name: str, manager, depth: int = 0) -> tuple[bool, bool]:
    """(needs_judge, needs_submission) of a task, or of any subtask of a group / tag."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 4:
        return False, False
    if entry["type"] in ("task", "python_task"):
        return _flags_from_yaml(Path(entry["yaml_path"]))
    subtasks = entry.get("task")
    if subtasks == -1 or subtasks is None:  # a group YAML: its `task:` list
        from lmms_eval import utils

        config = utils.load_yaml_config(entry["yaml_path"], mode="simple")
        subtasks = config.get("task") or []
    flags = [_flags(sub if isinstance(sub, str) else sub.get("task", ""), manager, depth + 1) for sub in subtasks]
    return any(f[0] for f in flags), any(f[1] for f in flags)


def _flags_from_yaml(yaml_path: Path) -> tuple[bool, bool]:
    """Judge / submission flags of a task read from its YAML (with includes) and utils modules.

    needs_submission: every metric is `submission` (the score comes from a server).
    needs_judge: a metric or its aggregation / process_results function is named like a judge
    (gpt, judge, llm_as), or those functions (or the functions of their module they reach) mention
    a judge API (llm_judge, OPENAI_API_KEY, API_KEY, openai, get_chat_response, gpt); "static"
    aggregations (lmms-eval's judge-free rule-based variants) are exempt. A heuristic: a wrong
    refusal is overridden with --allow-judge.
    """
    from lmms_eval import utils

    config = utils.load_yaml_config(str(yaml_path), mode="simple")
    metrics = [m for m in config.get("metric_list") or [] if isinstance(m, dict)]
    metric_names = [str(m.get("metric", "")) for m in metrics]
    submission = bool(metric_names) and all(n == "submission" for n in metric_names)

    functions = [_function_name(m.get("aggregation")) for m in metrics if m.get("metric") != "submission"]
    functions.append(_function_name(config.get("process_results")))
    functions = [f for f in functions if f]
    if any("static" in f for f in functions):
        return False, submission
    named = any(_JUDGE_WORDS.search(n) for n in metric_names if n != "submission") or any(
        _JUDGE_WORDS.search(f.rsplit(".", 1)[-1]) for f in functions
    )
    sourced = False
    for module, names in _by_module(functions).items():
        path = yaml_path.parent / f"{module.replace('.', '/')}.py"
        if path.is_file() and _calls_a_judge(path, names):
            sourced = True
    return named or sourced, submission


def _by_module(functions: list[str]) -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for function in functions:
        if "." in function:
            module, name = function.rsplit(".", 1)
            modules.setdefault(module, set()).add(name)
    return modules


def _calls_a_judge(path: Path, names: set[str]) -> bool:
    """Whether the functions `names` of a utils module, or the module's functions they reach,
    mention a judge API (the module as a whole may serve judge and rule-based variants)."""
    source = path.read_text(errors="replace")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return bool(_JUDGE_SOURCE.search(source))
    defs = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    stack, seen = list(names), set()
    while stack:
        name = stack.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        if _JUDGE_SOURCE.search(ast.get_source_segment(source, defs[name]) or ""):
            return True
        for node in ast.walk(defs[name]):
            ref = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if ref in defs:
                stack.append(ref)
    return False


def _function_name(node: Any) -> str | None:
    """`utils.fn` from a `!function utils.fn` node as lmms-eval's simple YAML mode leaves it."""
    value = getattr(node, "value", None)
    if getattr(node, "tag", None) == "!function" and isinstance(value, str):
        return value
    return None


def list_tasks() -> list[dict[str, Any]]:
    """Rows for `vtcbench tasks`: short name, lmms-eval task, flags, description."""
    return [
        {
            "short": info.short,
            "lmms_name": info.lmms_name,
            "needs_judge": info.needs_judge,
            "needs_submission": info.needs_submission,
            "description": info.description,
        }
        for info in TASKS.values()
    ]


def short_name(task_name: str) -> str:
    """The name a user gave for a task as lmms-eval reports it (local, lmms-eval or short)."""
    name = task_name.removeprefix(LOCAL_PREFIX)
    info = _BY_LMMS.get(name)
    return info.short if info else name


# --------------------------------------------------------------------------------------------
# offline datasets


@dataclass(frozen=True)
class LocalData:
    """Where a task's split lives on disk and how lmms-eval is to read it."""

    kind: str  # "parquet" | "arrow" (a Dataset.save_to_disk folder) | "disk" (DatasetDict.save_to_disk)
    path: Path  # the file or folder found
    files: tuple[Path, ...]  # data files (parquet / arrow); for "disk", the split's arrow files
    features: Any  # datasets.Features, read from the files' schema (parquet) or dataset_info.json

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.features)

    @property
    def folder(self) -> Path:
        """The data folder relative image paths are resolved against (local_images)."""
        return self.path if self.path.is_dir() else self.path.parent


def local_task_config(info: TaskInfo, data_path: Path, workdir: Path) -> str:
    """Write an include YAML in `workdir` that runs `info`'s task on local data; return its task name.

    `data_path` (the `--data-dir`) holds, for a task with short name S and lmms-eval name L (then
    `info.data`; the first found wins): `S.parquet` / `L.parquet`, or a folder `S/` / `L/` that is a
    `save_to_disk` folder (Dataset or DatasetDict) or holds parquet files (a hub snapshot such as
    `docvqa/DocVQA/validation-00000-of-00006.parquet` works: files named `<split>-*.parquet`,
    under the config's folder when there is one, are preferred). The rows must have the schema of
    the hub dataset lmms-eval uses. GQA also needs its images (`S_images.parquet`, `L_images/`, or
    the `testdev_balanced_images` folder of a snapshot), unless the questions carry an `image`.

    Raises VtcbenchError (one line) when the data is missing, lacks the split or a column the task
    reads, or GQA images do not cover every question.
    """
    data_path = Path(data_path).expanduser().resolve()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shipped = task_yaml(info)
    config = _simple_config(shipped)
    split = config.get("test_split") or config.get("validation_split")
    if not split:
        raise VtcbenchError(f"task {info.lmms_name!r} names no test or validation split; it cannot run on local data")
    config_name = config.get("dataset_name")
    keys = _data_keys(info)

    data = find_local_data(keys, data_path, split, config_name)
    if data is None:
        raise VtcbenchError(
            f"no offline data for task {info.short!r} ({info.lmms_name}): expected "
            f"{_expected(keys, data_path)} with split {split!r} in the schema of {config.get('dataset_path')}"
        )
    missing = [c for c in REQUIRED_COLUMNS.get(info.lmms_name, ()) if c not in data.columns]
    if missing:
        raise VtcbenchError(
            f"offline data for task {info.short!r} at {data.path} lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(data.columns)}); it must have the schema of {config.get('dataset_path')}"
        )

    casts = image_casts(data.features, f"task {info.short!r} at {data.path}")

    name = f"{LOCAL_PREFIX}{info.lmms_name}"
    lines = [
        "# written by vtcbench: lmms-eval's task on local data",
        f"include: {json.dumps(str(shipped))}",
        f"task: {json.dumps(name)}",
        "dataset_name: null",
    ]
    if data.kind == "disk":
        lines += [f"dataset_path: {json.dumps(str(data.path))}", "dataset_kwargs:", "  load_from_disk: true"]
    else:
        lines += [
            f"dataset_path: {data.kind}",
            "dataset_kwargs:",
            "  data_files:",
            f"    {json.dumps(split)}:",
            *[f"      - {json.dumps(str(f))}" for f in data.files],
        ]

    if _is_gqa(config):  # its process_docs would download the images config
        if "image" in data.columns:
            module = _write_module(workdir, name, "GQA questions with their images inline", "make_image_docs",
                                   "vtcbench.tasks.local_images", [repr(casts), repr(str(data.folder))])
        else:
            module = _gqa_images_module(keys, data_path, data, split, name, workdir)
        lines.append(f"process_docs: !function {module}.process_docs")
    elif casts:  # image columns to read as images, then the task's own process_docs if it has one
        own = str(shipped) if _function_name(config.get("process_docs")) else None
        module = _write_module(workdir, name, "the image columns read as images", "make_image_docs",
                               "vtcbench.tasks.local_images", [repr(casts), repr(str(data.folder)), repr(own)])
        lines.append(f"process_docs: !function {module}.process_docs")
    (workdir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name


def find_local_data(keys: list[str], data_path: Path, split: str, config_name: str | None = None) -> LocalData | None:
    """The first of `<key>.parquet` / `<key>/` under data_path that holds `split`, else None."""
    for key in keys:
        file = data_path / f"{key}.parquet"
        if file.is_file():
            return LocalData("parquet", file, (file,), _parquet_features([file]))
        folder = data_path / key
        if folder.is_dir():
            return _folder_data(folder, split, config_name)
    return None


def _folder_data(folder: Path, split: str, config_name: str | None) -> LocalData:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise VtcbenchError(f"saved dataset {folder} has split(s) {', '.join(splits) or 'none'}, not {split!r}")
        from vtcbench.tasks.offline_gqa import arrow_files_of_saved_dataset

        return LocalData("disk", folder, tuple(arrow_files_of_saved_dataset(folder / split)), _saved_features(folder / split))
    if (folder / "state.json").is_file():
        from vtcbench.tasks.offline_gqa import arrow_files_of_saved_dataset

        return LocalData("arrow", folder, tuple(arrow_files_of_saved_dataset(folder)), _saved_features(folder))
    files = _split_parquet_files(folder, split, config_name)
    if not files:
        raise VtcbenchError(
            f"{folder} is neither a save_to_disk folder nor holds parquet files (looked for {split}-*.parquet and *.parquet)"
        )
    return LocalData("parquet", folder, tuple(files), _parquet_features(files))


def _split_parquet_files(folder: Path, split: str, config_name: str | None) -> list[Path]:
    named = sorted(
        p for p in folder.rglob("*.parquet") if p.name == f"{split}.parquet" or p.name.startswith(f"{split}-")
    )
    if config_name:
        in_config = [p for p in named if config_name in p.relative_to(folder).parts[:-1]]
        if in_config:
            return in_config
        if any(len(p.relative_to(folder).parts) > 1 for p in named):
            named = [p for p in named if len(p.relative_to(folder).parts) == 1] or named
    return named or sorted(folder.glob("*.parquet"))


def _parquet_features(files: list[Path]):
    """The columns and types of parquet files (datasets' features: the schema's own tag where the
    file has one, else inferred from the arrow types), every file's footer read, so a truncated or
    damaged file stops the run here."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features

    schemas = []
    for file in files:
        try:
            schemas.append(pq.read_schema(file))
        except (OSError, ValueError, pa.ArrowException) as error:
            raise VtcbenchError(f"cannot read parquet file {file}: {str(error).splitlines()[0]}") from None
    try:
        return Features.from_arrow_schema(schemas[0])
    except (ValueError, TypeError, KeyError) as error:
        raise VtcbenchError(f"cannot read the column types of {files[0]}: {error}") from None


def _saved_features(folder: Path):
    from datasets import Features

    info = json.loads((folder / "dataset_info.json").read_text())
    return Features.from_dict(info.get("features", {}))


def _write_module(workdir: Path, name: str, what: str, factory: str, source: str, arguments: list[str]) -> str:
    """A two-line module `process_docs = factory(arguments)` beside the include YAML (a YAML
    `!function` names a function, not a call); returns its name."""
    module = f"{name}_docs"
    (workdir / f"{module}.py").write_text(
        f"# written by vtcbench: process_docs for {what}\n"
        f"from {source} import {factory}\n\n"
        f"process_docs = {factory}({', '.join(arguments)})\n"
    )
    return module


def _expected(keys: list[str], data_path: Path) -> str:
    files = " or ".join(str(data_path / f"{k}.parquet") for k in keys)
    folders = " or ".join(f"{data_path / k}/" for k in keys)
    return f"{files}, or a folder {folders} (save_to_disk or parquet files)"


def shipped_data(info: TaskInfo, data_dir: Path | None) -> Path:
    """The data folder of a shipped task: `data_dir` when it holds the task's data, else the
    folder of the generated default (written on first use)."""
    keys = _data_keys(info)
    if data_dir is not None and any((Path(data_dir) / f"{k}.parquet").is_file() or (Path(data_dir) / k).is_dir() for k in keys):
        return Path(data_dir)
    if "vtcshapes" in keys:
        from vtcbench import shapes

        return shapes.default_dataset().parent
    raise VtcbenchError(f"no data for shipped task {info.short!r}: expected {_expected(keys, Path(data_dir or '.'))}")


def _data_keys(info: TaskInfo) -> list[str]:
    """The names a task's offline data is looked for under, in order: its own, then `info.data`."""
    return list(dict.fromkeys([info.short, info.lmms_name, *([info.data] if info.data else [])]))


def task_yaml(info: TaskInfo) -> Path:
    """The YAML that defines the task: vtcbench's own for shipped tasks, else lmms-eval's."""
    if info.shipped_yaml is not None:
        return SHIPPED_DIR / info.shipped_yaml
    relative = _YAML.get(info.lmms_name)
    if relative is not None:
        path = lmms_tasks_dir() / relative
        if path.is_file():
            return path
    entry = _default_manager().task_index.get(info.lmms_name)
    if entry is None or entry.get("type") != "task":
        raise VtcbenchError(f"task {info.lmms_name!r} is not a single lmms-eval task YAML; local data needs one")
    return Path(entry["yaml_path"])


def _simple_config(yaml_path: Path) -> dict:
    from lmms_eval import utils

    return utils.load_yaml_config(str(yaml_path), mode="simple")


def _is_gqa(config: dict) -> bool:
    """Tasks whose process_docs is lmms-eval's hub-bound GQA image join."""
    return _function_name(config.get("process_docs")) == "utils.gqa_process_docs"


def _gqa_images_module(keys, data_path: Path, questions: LocalData, split: str, name: str, workdir: Path) -> str:
    image_keys = [f"{k}_images" for k in keys]
    images = find_local_data(image_keys, data_path, split)
    if images is None and questions.kind == "parquet" and questions.path.is_dir():
        snapshot = sorted(p for p in questions.path.rglob("*.parquet") if "testdev_balanced_images" in p.parts)
        if snapshot:
            images = LocalData("parquet", questions.path, tuple(snapshot), _parquet_features(snapshot))
    if images is None:
        raise VtcbenchError(
            f"task 'gqa' needs its images offline: expected {_expected(image_keys, data_path)} with columns id, image "
            f"(lmms-lab GQA testdev_balanced_images), or an 'image' column in {questions.path}"
        )
    lacking = [c for c in ("id", "image") if c not in images.columns]
    if lacking:
        raise VtcbenchError(f"GQA images at {images.path} lack column(s) {', '.join(lacking)} (need id, image)")
    layout = image_casts(images.features, f"task 'gqa' images at {images.path}").get("image", "image")
    from vtcbench.tasks.offline_gqa import read_column

    kind = "parquet" if images.kind == "parquet" else "arrow"
    question_kind = "parquet" if questions.kind == "parquet" else "arrow"
    have = set(read_column(kind, images.files, "id"))
    absent = sorted(set(read_column(question_kind, questions.files, "imageId")) - have)
    if absent:
        raise VtcbenchError(
            f"GQA images at {images.path} miss {len(absent)} imageId(s) of the questions in {questions.path}, e.g. {absent[0]!r}"
        )
    return _write_module(
        workdir, name, "GQA with the images read from local files", "make_process_docs", "vtcbench.tasks.offline_gqa",
        [repr(kind), repr([str(f) for f in images.files]), f"layout={layout!r}", f"base={str(images.folder)!r}"],
    )
