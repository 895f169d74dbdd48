"""Start a job's worker on GKE: a Kubernetes Job on one host, a JobSet for a multi-host run.

`build_job` and `build_jobset` are pure: a `V1Job` of the kubernetes client's types, and a
JobSet (a custom resource the client has no class for) as the dict that
`ApiClient().sanitize_for_serialization` makes of its typed parts; both tested by value.
`GkeLauncher` only sends them, reads them back and deletes them.

Why the objects are what they are:

- each node has its own cluster in its own region (its data never leaves it); in it,
  the workers' namespace (`fedpipe`) holds the node's Kubernetes service account
  (`worker-<node>`), which Workload Identity binds to the node's worker Google service
  account and nothing else: a node's workers act as that node and no other. The
  account's name carries the node because Workload Identity names it project-wide
  (`<project>.svc.id.goog[<namespace>/<account>]`): a namespace alone could not tell
  two nodes' clusters apart (infra/accelerators.tf makes clusters, accounts, bindings);
- the name derives from (job id, attempt): a retried launch meets 409 and returns the
  same handle instead of starting a second run;
- backoffLimit 0 and JobSet maxRestarts 0: fedpipe's job queue owns retries, a new
  attempt each; activeDeadlineSeconds is the fleet's max run plus the queue's patience
  (Kubernetes counts from creation, pods pending for capacity included);
  ttlSecondsAfterFinished keeps a finished object a day for `state` and logs;
- TPU pods select their slice (`cloud.google.com/gke-tpu-accelerator`, `-topology`),
  tolerate the TPU taint and ask for `google.com/tpu` = chips per host; GPU pods select
  `cloud.google.com/gke-accelerator` and ask for `nvidia.com/gpu`;
- a multi-host run is one replicated job of `hosts` indexed pods; the JobSet's headless
  service gives pod 0 the stable name `<jobset>-w-0-0.<jobset>`, the coordinator, and
  each pod's completion index (a fieldRef on its annotation) is its process id;
- the worker never talks to the Kubernetes API: no service account token is mounted.

Each node's cluster is reached at its DNS endpoint (`gke-....gke.goog`: a certificate of a
public CA, so no cluster CA to carry) with the caller's Google OAuth token. Importing this
module imports the kubernetes client.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import google.auth
import google.auth.transport.requests
import urllib3
from google.auth import exceptions as auth_exceptions
from kubernetes import client as k8s

from shared.accelerators import Accelerator
from shared.jobs import MAX_QUEUED, Job
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.launchers.fleet import Fleet
from shared.launchers.naming import parse_pairs, resource_name
from shared.multihost import COORDINATOR_PORT, ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

CONTAINER_NAME = "trainer"
JOBSET_GROUP, JOBSET_VERSION, JOBSETS, JOBS = "jobset.x-k8s.io", "v1alpha2", "jobsets", "jobs"
REPLICATED_JOB = "w"  # short: the pods' host names are <jobset>-w-0-<index>
JOB_NAME_MAX = 52  # its pods are <job>-<5 characters>, and labels carry the name: all within 63
JOBSET_NAME_MAX = 40  # the JobSet's pods are <jobset>-w-0-<index>-<5 characters>
FINISHED_TTL = timedelta(days=1)
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"  # one slice's pods on one node pool
JOB_ID_ANNOTATION = "fedpipe/job-id"  # the exact job id (names and labels hold a slug)

TPU_RESOURCE = "google.com/tpu"
GPU_RESOURCE = "nvidia.com/gpu"
GKE_TPU_ACCELERATORS = {  # cloud.google.com/gke-tpu-accelerator, per TPU version
    "v4": "tpu-v4-podslice",
    "v5e": "tpu-v5-lite-podslice",
    "v5p": "tpu-v5p-slice",
    "v6e": "tpu-v6e-slice",
}
# Pods land only on nodes that serve Workload Identity's metadata server (a Standard cluster may mix pools).
WORKLOAD_IDENTITY_NODES = {"iam.gke.io/gke-metadata-server-enabled": "true"}

ENV_CLUSTERS = "FEDPIPE_GKE_CLUSTERS"  # "us=gke-0123.us-central1.gke.goog,eu=...": each node's cluster's DNS endpoint
ENV_NAMESPACE = "FEDPIPE_GKE_NAMESPACE"  # the workers' namespace in every node's cluster, default "fedpipe"
ENV_SERVICE_ACCOUNTS = "FEDPIPE_GKE_SERVICE_ACCOUNT"  # "us=worker-us,...": each node's Kubernetes service account
DEFAULT_NAMESPACE = "fedpipe"
LABEL_VALUE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]")
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def require_label(node: str) -> str:
    """The node's name, which labels every object of its runs; one that is no label value cannot run on GKE."""
    if not LABEL_VALUE.fullmatch(node):
        raise ValueError(f"node {node!r} is not a Kubernetes label value: GKE nodes are named with letters and digits, '-', '_' or '.' inside")
    return node


def _placement(accelerator: Accelerator) -> tuple[dict[str, str], list[k8s.V1Toleration] | None, dict[str, str] | None]:
    """(node selector, tolerations, resource limits) that put a pod on its accelerator."""
    if accelerator.kind == "tpu":
        selector = {
            "cloud.google.com/gke-tpu-accelerator": GKE_TPU_ACCELERATORS[accelerator.type or ""],
            "cloud.google.com/gke-tpu-topology": accelerator.topology or "",
        }
        toleration = k8s.V1Toleration(key=TPU_RESOURCE, operator="Exists", effect="NoSchedule")
        return {**selector, **WORKLOAD_IDENTITY_NODES}, [toleration], {TPU_RESOURCE: str(accelerator.chips_per_host)}
    if accelerator.kind == "gpu":
        selector = {"cloud.google.com/gke-accelerator": accelerator.type or ""}
        return {**selector, **WORKLOAD_IDENTITY_NODES}, None, {GPU_RESOURCE: str(accelerator.count)}
    return dict(WORKLOAD_IDENTITY_NODES), None, None


def _labels(job: Job, name: str) -> dict[str, str]:
    """Kubernetes labels of every object of the attempt (the node's name is a label value: see require_label)."""
    return {"app": "fedpipe", "fedpipe-node": job.spec.dataset.node, "fedpipe-attempt": str(job.attempt), "fedpipe-name": name}


def _pod_template(job: Job, name: str, service_account: str, image: str, env: list[k8s.V1EnvVar]) -> k8s.V1PodTemplateSpec:
    selector, tolerations, limits = _placement(job.spec.accelerator)
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        env=env,
        resources=k8s.V1ResourceRequirements(limits=limits, requests=limits) if limits else None,
    )
    pod = k8s.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        service_account_name=service_account,
        automount_service_account_token=False,
        node_selector=selector,
        tolerations=tolerations,
    )
    return k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=_labels(job, name)), spec=pod)


def _env(values: Mapping[str, str]) -> list[k8s.V1EnvVar]:
    return [k8s.V1EnvVar(name=key, value=value) for key, value in values.items()]


def _deadline(max_run: timedelta) -> int:
    if max_run <= timedelta(0):
        raise ValueError(f"max_run must be positive, got {max_run}")
    return int((max_run + MAX_QUEUED).total_seconds())


def _metadata(job: Job, name: str, namespace: str, annotations: Mapping[str, str] | None = None) -> k8s.V1ObjectMeta:
    return k8s.V1ObjectMeta(
        name=name, namespace=namespace, labels=_labels(job, name), annotations={JOB_ID_ANNOTATION: job.id, **(annotations or {})}
    )


def build_job(
    job: Job, *, namespace: str, service_account: str, image: str, env: Mapping[str, str], max_run: timedelta, name_prefix: str = "fedpipe"
) -> k8s.V1Job:
    """The Job that runs `job.attempt` on one host."""
    if job.spec.hosts != 1:
        raise ValueError(f"job {job.id} runs on {job.spec.hosts} hosts: that is a JobSet (build_jobset)")
    name = resource_name(name_prefix, job.id, job.attempt, JOB_NAME_MAX)
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=_metadata(job, name, namespace),
        spec=k8s.V1JobSpec(
            backoff_limit=0,
            completions=1,
            parallelism=1,
            active_deadline_seconds=_deadline(max_run),
            ttl_seconds_after_finished=int(FINISHED_TTL.total_seconds()),
            template=_pod_template(job, name, service_account, image, _env(env)),
        ),
    )


def coordinator_address(jobset: str) -> str:
    """Process 0's stable DNS name through the JobSet's headless service (named after the JobSet), and its port."""
    return f"{jobset}-{REPLICATED_JOB}-0-0.{jobset}:{COORDINATOR_PORT}"


def build_jobset(
    job: Job, *, namespace: str, service_account: str, image: str, env: Mapping[str, str], max_run: timedelta, name_prefix: str = "fedpipe"
) -> dict:
    """The JobSet that runs `job.attempt` on `job.spec.hosts` hosts, one indexed pod each."""
    hosts = job.spec.hosts
    if hosts < 2:
        raise ValueError(f"job {job.id} runs on one host: that is a Job (build_job)")
    name = resource_name(name_prefix, job.id, job.attempt, JOBSET_NAME_MAX)
    role = _env({**env, ENV_COORDINATOR: coordinator_address(name), ENV_NUM_PROCESSES: str(hosts)}) + [
        k8s.V1EnvVar(
            name=ENV_PROCESS_ID,
            value_from=k8s.V1EnvVarSource(field_ref=k8s.V1ObjectFieldSelector(field_path=f"metadata.annotations['{COMPLETION_INDEX}']")),
        )
    ]
    workers = k8s.V1JobTemplateSpec(
        spec=k8s.V1JobSpec(
            backoff_limit=0,
            completions=hosts,
            parallelism=hosts,
            completion_mode="Indexed",
            active_deadline_seconds=_deadline(max_run),
            template=_pod_template(job, name, service_account, image, role),
        )
    )
    annotations = {EXCLUSIVE_TOPOLOGY: "cloud.google.com/gke-nodepool"} if job.spec.accelerator.kind == "tpu" else None
    jobset = {
        "apiVersion": f"{JOBSET_GROUP}/{JOBSET_VERSION}",
        "kind": "JobSet",
        "metadata": _metadata(job, name, namespace, annotations),
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "ttlSecondsAfterFinished": int(FINISHED_TTL.total_seconds()),
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": workers}],
        },
    }
    return k8s.ApiClient().sanitize_for_serialization(jobset)


# ---------------------------------------------------------------- state


def _conditions(conditions) -> set[str]:
    """The condition types that hold (status "True"), from typed conditions or their dicts."""
    held = set()
    for c in conditions or []:
        kind, status = (c.get("type"), c.get("status")) if isinstance(c, dict) else (c.type, c.status)
        if status == "True":
            held.add(kind)
    return held


def job_run_state(job: k8s.V1Job) -> RunState:
    """A Job's state: its conditions once it ends, else running once its pod is ready."""
    if job.metadata is not None and job.metadata.deletion_timestamp is not None:
        return RunState.CANCELLED
    status = job.status or k8s.V1JobStatus()
    held = _conditions(status.conditions)
    if held & {"Complete", "SuccessCriteriaMet"}:
        return RunState.SUCCEEDED
    if held & {"Failed", "FailureTarget"}:
        return RunState.FAILED
    return RunState.RUNNING if (status.ready or 0) > 0 and "Suspended" not in held else RunState.QUEUED


def jobset_run_state(jobset: dict) -> RunState:
    """A JobSet's state: its conditions once it ends, else running once every pod of its job is ready."""
    if (jobset.get("metadata") or {}).get("deletionTimestamp"):
        return RunState.CANCELLED
    status = jobset.get("status") or {}
    held = _conditions(status.get("conditions"))
    if "Completed" in held or status.get("terminalState") == "Completed":
        return RunState.SUCCEEDED
    if "Failed" in held or status.get("terminalState") == "Failed":
        return RunState.FAILED
    ready = sum(int(r.get("ready") or 0) for r in status.get("replicatedJobsStatus") or [])
    return RunState.RUNNING if ready and "Suspended" not in held else RunState.QUEUED


# ---------------------------------------------------------------- handles


@dataclass(frozen=True)
class GkeRun:
    """What a handle names: `<node>/<namespace>/<jobs|jobsets>/<name>` (the node picks the cluster)."""

    node: str
    namespace: str
    plural: str
    name: str

    def __str__(self) -> str:
        return f"{self.node}/{self.namespace}/{self.plural}/{self.name}"

    @classmethod
    def parse(cls, execution: str) -> GkeRun:
        parts = execution.split("/")
        if len(parts) != 4 or parts[2] not in (JOBS, JOBSETS) or not all(parts):
            raise LaunchError(f"{execution!r} is not a GKE handle (<node>/<namespace>/jobs|jobsets/<name>)")
        return cls(*parts)


# ---------------------------------------------------------------- clusters


@dataclass(frozen=True)
class GkeConfig:
    """Each node's cluster (its DNS endpoint), the workers' namespace and each node's Kubernetes service account."""

    clusters: dict[str, str]
    namespace: str = DEFAULT_NAMESPACE
    service_accounts: dict[str, str] = field(default_factory=dict)  # a node not named here: worker-<node>

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GkeConfig:
        clusters = parse_pairs(env.get(ENV_CLUSTERS, ""), ENV_CLUSTERS)
        if not clusters:
            raise ValueError(f"{ENV_CLUSTERS} is not set (node=DNS endpoint pairs: each node's cluster)")
        return cls(
            clusters=clusters,
            namespace=env.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE,
            service_accounts=parse_pairs(env.get(ENV_SERVICE_ACCOUNTS, ""), ENV_SERVICE_ACCOUNTS),
        )

    def service_account(self, node: str) -> str:
        return self.service_accounts.get(node, f"worker-{node}")


@dataclass(frozen=True)
class KubeApis:
    """The two APIs the launcher uses, on one cluster."""

    batch: k8s.BatchV1Api
    custom: k8s.CustomObjectsApi


def connect(endpoint: str) -> KubeApis:
    """Clients for a GKE cluster's DNS endpoint, authenticated with this process's Google credentials (refreshed before expiry)."""
    credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])

    def bearer(configuration: k8s.Configuration) -> None:
        if not credentials.valid:
            credentials.refresh(google.auth.transport.requests.Request())
        configuration.api_key["BearerToken"] = credentials.token

    configuration = k8s.Configuration(host=f"https://{endpoint}")
    configuration.api_key_prefix["BearerToken"] = "Bearer"
    configuration.refresh_api_key_hook = bearer
    api = k8s.ApiClient(configuration)
    return KubeApis(batch=k8s.BatchV1Api(api), custom=k8s.CustomObjectsApi(api))


# What a Kubernetes call raises for a failed call: an API answer, no connection, no credentials.
K8S_ERRORS = (k8s.ApiException, urllib3.exceptions.HTTPError, auth_exceptions.GoogleAuthError)


def _status(exc: Exception) -> int | None:
    return exc.status if isinstance(exc, k8s.ApiException) else None


# ---------------------------------------------------------------- launcher


class GkeLauncher:
    """Implements `shared.launchers.Launcher` with a Job or JobSet per attempt in the node's cluster and namespace."""

    def __init__(self, fleet: Fleet, config: GkeConfig, apis: Mapping[str, KubeApis] | None = None) -> None:
        self.fleet = fleet
        self.config = config
        self._apis: dict[str, KubeApis] = dict(apis or {})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GkeLauncher:
        env = os.environ if env is None else env
        return cls(Fleet.from_env(env), GkeConfig.from_env(env))

    def apis(self, node: str) -> KubeApis:
        # Connected on first use: building a launcher must not need credentials.
        if node not in self._apis:
            clusters = self.config.clusters
            if node not in clusters:
                raise LaunchRefused(f"node {node!r} has no GKE cluster (known: {', '.join(sorted(clusters)) or 'none'})")
            self._apis[node] = connect(clusters[node])
        return self._apis[node]

    def request_for(self, job: Job) -> k8s.V1Job | dict:
        """The Job (one host) or JobSet (several) for the attempt; LaunchRefused where it can never run."""
        node = job.spec.dataset.node
        try:
            require_label(node)
        except ValueError as exc:
            raise LaunchRefused(f"job {job.id}: {exc}") from exc
        build = build_job if job.spec.hosts == 1 else build_jobset
        return build(
            job, namespace=self.config.namespace, service_account=self.config.service_account(node),
            image=self.fleet.image(job), env=self.fleet.env(job), max_run=self.fleet.max_run, name_prefix=self.fleet.infra_prefix,
        )

    def launch(self, job: Job) -> str:
        """Create the Job or JobSet and return its handle; does not wait for its pods."""
        body = self.request_for(job)
        apis = self.apis(job.spec.dataset.node)
        is_job = isinstance(body, k8s.V1Job)
        metadata = body.metadata if is_job else k8s.V1ObjectMeta(**body["metadata"])
        run = GkeRun(job.spec.dataset.node, metadata.namespace, JOBS if is_job else JOBSETS, metadata.name)
        try:
            if is_job:
                apis.batch.create_namespaced_job(namespace=run.namespace, body=body)
            else:
                apis.custom.create_namespaced_custom_object(
                    group=JOBSET_GROUP, version=JOBSET_VERSION, namespace=run.namespace, plural=JOBSETS, body=body
                )
        except K8S_ERRORS as exc:
            if _status(exc) != 409:  # 409: this attempt's object exists, made by an earlier launch
                raise LaunchError(f"job {job.id}: could not create {run}: {exc}") from exc
        return str(run)

    def state(self, execution: str) -> RunState:
        run = GkeRun.parse(execution)
        apis = self.apis(run.node)
        try:
            if run.plural == JOBS:
                return job_run_state(apis.batch.read_namespaced_job_status(name=run.name, namespace=run.namespace))
            return jobset_run_state(apis.custom.get_namespaced_custom_object_status(
                group=JOBSET_GROUP, version=JOBSET_VERSION, namespace=run.namespace, plural=JOBSETS, name=run.name,
            ))
        except K8S_ERRORS as exc:
            if _status(exc) == 404:
                return RunState.GONE
            raise LaunchError(f"could not read the state of {run}: {exc}") from exc

    def stop(self, execution: str) -> None:
        """Delete the Job or JobSet and, first, its pods (Foreground); one that is gone needs nothing."""
        run = GkeRun.parse(execution)
        apis = self.apis(run.node)
        foreground = k8s.V1DeleteOptions(propagation_policy="Foreground")
        try:
            if run.plural == JOBS:
                apis.batch.delete_namespaced_job(name=run.name, namespace=run.namespace, body=foreground)
            else:
                apis.custom.delete_namespaced_custom_object(
                    group=JOBSET_GROUP, version=JOBSET_VERSION, namespace=run.namespace, plural=JOBSETS, name=run.name, body=foreground,
                )
        except K8S_ERRORS as exc:
            if _status(exc) != 404:
                raise LaunchError(f"could not stop {run}: {exc}") from exc
