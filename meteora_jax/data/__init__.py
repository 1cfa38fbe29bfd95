"""Task data: MeteoRA's folder-per-task JSONL layout (``tasks``) and the BIG-bench importer (``bigbench``)."""

from meteora_jax.data.tasks import (
    Example,
    list_tasks,
    read_jsonl,
    read_split,
    split_train_test,
    write_jsonl_atomic,
)

__all__ = ["Example", "list_tasks", "read_jsonl", "read_split", "split_train_test", "write_jsonl_atomic"]
