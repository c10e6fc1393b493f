"""Benchmarks: short names over lmms-eval tasks, judge/submission flags, offline datasets."""

from vtcbench.tasks.registry import (
    LOCAL_PREFIX,
    REQUIRED_COLUMNS,
    TASKS,
    LocalData,
    TaskInfo,
    find_local_data,
    list_tasks,
    lmms_tasks_dir,
    local_task_config,
    resolve_tasks,
    shipped_data,
    short_name,
    task_manager,
)

__all__ = [
    "LOCAL_PREFIX",
    "REQUIRED_COLUMNS",
    "TASKS",
    "LocalData",
    "TaskInfo",
    "find_local_data",
    "list_tasks",
    "lmms_tasks_dir",
    "local_task_config",
    "resolve_tasks",
    "shipped_data",
    "short_name",
    "task_manager",
]
