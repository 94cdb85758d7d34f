"""What a pipeline's tasks ask of a cluster: CPU and memory, and whether a failed pod is tried again.

`kfp.local` ignores both; on Kubeflow a task without requests runs BestEffort (first evicted) and one
without limits is rejected by a namespace ResourceQuota.
"""

from kfp import dsl

# A retry reruns a pod that was evicted, preempted or lost its node. Safe for a task whose only effects
# are its own output artifacts or idempotent writes (Feast's apply + materialize, a create-or-patch);
# not for one that appends to shared state, such as the promotion gate's registration.
RETRIES = 2
BACKOFF = "60s"


def sized(task: dsl.PipelineTask, cpu_request, cpu_limit, memory, retry: bool = True) -> dsl.PipelineTask:
    """Requests and limits from pipeline parameters; memory's request is its limit, so a pod is never
    OOM-killed for memory its node only lent it."""
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit).set_memory_request(memory).set_memory_limit(memory)
    if retry:
        task.set_retry(num_retries=RETRIES, backoff_duration=BACKOFF, backoff_factor=2.0)
    return task
