"""What a pipeline's tasks ask of a cluster: CPU and memory, and whether a failed pod is tried again.

`kfp.local` ignores both; on Kubeflow a task without requests runs BestEffort (first evicted) and one
without limits is rejected by a namespace ResourceQuota.
"""

from kfp import dsl, kubernetes

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


# The standard AWS variables gts_lum.data.storage reads, from the keys of one Secret of the run's
# namespace (the operator's; README, "First run on a cluster"). Optional: a run on synth: data with a
# registry elsewhere needs none. A Secret, not a fixed variable, because kfp.local would apply a fixed one too.
OBJECT_STORE_KEYS = {"endpoint": "AWS_ENDPOINT_URL", "access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY"}


def reads_object_storage(task: dsl.PipelineTask, secret) -> dsl.PipelineTask:
    """Give a task that reads or writes s3:// / minio:// URIs itself (not through KFP's artifacts) the
    endpoint and keys of the object store in Secret `secret`."""
    return kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=OBJECT_STORE_KEYS, optional=True)
