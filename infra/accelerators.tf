# Accelerator backends: what the GKE (Kubernetes Jobs / JobSets on TPU and GPU node
# pools), Vertex AI (custom jobs on TPU v5e/v6e and GPUs, DWS flex-start) and Cloud
# Batch launchers need. Each is off unless its variable turns it on, so a plain
# deploy stays small (README, "Accelerator backends").
#
#   gke_enabled     one private GKE Standard cluster per node, in the node's region
#                   (data sovereignty: a node's pods run where its data is), with
#                   Workload Identity, a small system pool and a TPU and a GPU node
#                   pool that autoscale from 0; the node's Kubernetes service account
#                   acts as the node's worker service account, nothing else does.
#   vertex_enabled  the API and the hub's grants; jobs run as the node's worker
#                   identity in the node's region (the launcher picks the machine,
#                   the TPU or GPU and the flex-start scheduling per job).
#   batch_enabled   the API and the grants for plain (non-confidential) Batch jobs;
#                   confidential Batch is confidential.tf's.
#
# Grants the Batch and Vertex AI backends share with the confidential launchers
# (the hub's actAs on each worker identity, batch.jobsEditor, the worker subnet,
# the workers' project roles on VMs) stay the single resources of confidential.tf,
# whose for_each widens to these switches: one binding, one resource, so turning
# one switch off never removes a binding another still needs.

variable "gke_enabled" {
  description = "Create a private GKE cluster per node (its region) with TPU and GPU node pools scaling from 0, for the GKE launcher. Costs a cluster fee per node and one small system node each."
  type        = bool
  default     = false
}

variable "vertex_enabled" {
  description = "Enable Vertex AI and grant the hub what the Vertex AI launcher needs (aiplatform.user, actAs on the worker identities)."
  type        = bool
  default     = false
}

variable "batch_enabled" {
  description = "Enable Cloud Batch and grant the hub and the workers what plain (non-confidential) Batch jobs need."
  type        = bool
  default     = false
}

# Which engine runs what (shared/launchers/routing.py): CPU and Cloud Run's one L4 on one host run on Cloud
# Run Jobs; TPU slices on FEDPIPE_TPU_BACKEND; other GPUs and every multi-host run on FEDPIPE_GPU_BACKEND.
variable "tpu_backend" {
  description = "Engine of TPU jobs: gke or vertex; null = gke if gke_enabled, else vertex if vertex_enabled (FEDPIPE_TPU_BACKEND). The engine named must be enabled."
  type        = string
  default     = null

  validation {
    condition     = var.tpu_backend == null || contains(["gke", "vertex"], coalesce(var.tpu_backend, "-"))
    error_message = "tpu_backend: gke or vertex (shared.launchers.routing.TPU_BACKENDS)."
  }
}

variable "gpu_backend" {
  description = "Engine of GPU jobs beyond Cloud Run's one L4 and of every multi-host run: gke, batch or vertex; null = the first enabled of gke, batch, vertex (FEDPIPE_GPU_BACKEND). The engine named must be enabled."
  type        = string
  default     = null

  validation {
    condition     = var.gpu_backend == null || contains(["gke", "batch", "vertex"], coalesce(var.gpu_backend, "-"))
    error_message = "gpu_backend: gke, batch or vertex (shared.launchers.routing.GPU_BACKENDS)."
  }
}

# The worker image of each accelerator kind on GKE, Vertex AI and Batch (shared/launchers/fleet.py), pinned by
# digest: the launchers refuse tags (a key-release policy allowlists digests, and a tag can move). A kind
# without an image is refused by those engines (its jobs fail with the reason), never run from a tag.
variable "accelerator_image_cpu" {
  description = "FEDPIPE_WORKER_IMAGE_CPU: the trainer (workers/trainer/Dockerfile) by digest, REGISTRY/PATH@sha256:<64 hex>; null = none."
  type        = string
  default     = null

  validation {
    condition     = var.accelerator_image_cpu == null || can(regex("^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+@sha256:[0-9a-f]{64}$", var.accelerator_image_cpu))
    error_message = "accelerator_image_cpu must be pinned by digest: REGISTRY/PATH@sha256:<64 lowercase hex>, no tag."
  }
}

variable "accelerator_image_gpu" {
  description = "FEDPIPE_WORKER_IMAGE_GPU: the CUDA trainer (workers/trainer/Dockerfile.gpu) by digest; null = none."
  type        = string
  default     = null

  validation {
    condition     = var.accelerator_image_gpu == null || can(regex("^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+@sha256:[0-9a-f]{64}$", var.accelerator_image_gpu))
    error_message = "accelerator_image_gpu must be pinned by digest: REGISTRY/PATH@sha256:<64 lowercase hex>, no tag."
  }
}

variable "accelerator_image_tpu" {
  description = "FEDPIPE_WORKER_IMAGE_TPU: the TPU trainer (workers/trainer/Dockerfile.tpu) by digest; null = none."
  type        = string
  default     = null

  validation {
    condition     = var.accelerator_image_tpu == null || can(regex("^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+@sha256:[0-9a-f]{64}$", var.accelerator_image_tpu))
    error_message = "accelerator_image_tpu must be pinned by digest: REGISTRY/PATH@sha256:<64 lowercase hex>, no tag."
  }
}

variable "accelerator_max_run_seconds" {
  description = "FEDPIPE_MAX_RUN_SECONDS: the wall-clock bound of one run on GKE, Vertex AI or Batch, queueing not counted; null = the launchers' default (6 h). At most 7 days (DWS flex-start's bound)."
  type        = number
  default     = null

  validation {
    condition     = var.accelerator_max_run_seconds == null || try(var.accelerator_max_run_seconds >= 1 && var.accelerator_max_run_seconds <= 604800 && floor(var.accelerator_max_run_seconds) == var.accelerator_max_run_seconds, false)
    error_message = "accelerator_max_run_seconds: a whole number of seconds from 1 to 604800 (7 days)."
  }
}

variable "gke_namespace" {
  description = "Kubernetes namespace of the workers in each node's cluster."
  type        = string
  default     = "fedpipe"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", var.gke_namespace))
    error_message = "gke_namespace: a DNS label (lowercase letters, digits, '-')."
  }
}

variable "gke_zones" {
  description = "Zone of each node's accelerator node pools, in the node's region, where the TPU and GPU machine types are offered (TPU slices and GPUs are zonal). Every GKE node needs one."
  type        = map(string)
  default = {
    us = "us-central1-a"
    eu = "europe-west4-b"
  }
}

variable "gke_cidrs" {
  description = "IP ranges of each node's GKE subnet: nodes (primary), pods and services (secondary), and the control plane's /28. Must not overlap worker_subnet_cidrs or each other."
  type = map(object({
    nodes         = string
    pods          = string
    services      = string
    control_plane = string
  }))
  default = {
    us = { nodes = "10.16.0.0/20", pods = "10.20.0.0/14", services = "10.24.0.0/20", control_plane = "172.16.0.0/28" }
    eu = { nodes = "10.17.0.0/20", pods = "10.28.0.0/14", services = "10.25.0.0/20", control_plane = "172.16.0.16/28" }
  }

  validation {
    condition     = alltrue([for c in values(var.gke_cidrs) : can(cidrhost(c.nodes, 0)) && can(cidrhost(c.pods, 0)) && can(cidrhost(c.services, 0)) && can(regex("/28$", c.control_plane))])
    error_message = "gke_cidrs: IPv4 CIDR ranges, the control plane's a /28."
  }
}

variable "gke_system_machine_type" {
  description = "Machine type of each cluster's system pool (kube-dns, the JobSet controller): the accelerator pools are tainted, so they need a node of their own."
  type        = string
  default     = "e2-standard-2"
}

variable "gke_tpu" {
  description = "Each node's TPU pool: v5e by default (ct5lp-hightpu-4t; v6e: ct6e-standard-4t). topology null = single-host nodes; set (e.g. \"4x4\") for one multi-host slice, max_nodes = its hosts."
  type = object({
    enabled      = optional(bool, true)
    machine_type = optional(string, "ct5lp-hightpu-4t")
    topology     = optional(string)
    max_nodes    = optional(number, 1)
    spot         = optional(bool, false)
  })
  default = {}

  validation {
    condition     = var.gke_tpu.max_nodes >= 1 && (var.gke_tpu.topology == null || can(regex("^[1-9][0-9]*(x[1-9][0-9]*){1,2}$", coalesce(var.gke_tpu.topology, "-"))))
    error_message = "gke_tpu: max_nodes >= 1; topology like \"2x4\" or \"2x2x4\"."
  }
}

variable "gke_gpu" {
  description = "Each node's GPU pool: machine type, GPU type and count per node (as shared.accelerators names them), and DWS flex-start (no reservation, no spot)."
  type = object({
    enabled           = optional(bool, true)
    machine_type      = optional(string, "g2-standard-8")
    accelerator       = optional(string, "nvidia-l4")
    accelerator_count = optional(number, 1)
    max_nodes         = optional(number, 2)
    spot              = optional(bool, false)
    flex_start        = optional(bool, false)
  })
  default = {}

  validation {
    condition     = var.gke_gpu.max_nodes >= 1 && contains([1, 2, 4, 8], var.gke_gpu.accelerator_count) && !(var.gke_gpu.flex_start && var.gke_gpu.spot)
    error_message = "gke_gpu: max_nodes >= 1, accelerator_count 1, 2, 4 or 8, and flex_start excludes spot."
  }
}

locals {
  gke_nodes            = var.gke_enabled ? var.nodes : {}
  accelerators_enabled = var.gke_enabled || var.vertex_enabled || var.batch_enabled

  # The Kubernetes service account each node's workers run as, in its own cluster. Workload
  # Identity names it project-wide (<project>.svc.id.goog[<namespace>/<ksa>]), so the name
  # carries the node: a pod in another node's cluster cannot pass for it by namespace alone.
  gke_ksa        = { for node, _ in var.nodes : node => "worker-${node}" }
  workload_pool  = "${var.project}.svc.id.goog"
  gke_ksa_member = { for node, ksa in local.gke_ksa : node => "serviceAccount:${local.workload_pool}[${var.gke_namespace}/${ksa}]" }

  accelerator_apis = toset(concat(
    var.gke_enabled ? ["container.googleapis.com", "binaryauthorization.googleapis.com"] : [],
    var.vertex_enabled ? ["aiplatform.googleapis.com"] : [],
    var.batch_enabled ? ["batch.googleapis.com"] : [],
  ))
}

resource "google_project_service" "accelerators" {
  for_each           = local.accelerator_apis
  service            = each.value
  disable_on_destroy = false
}

# ---------------------------------------------------------------------------
# GKE: one private cluster per node, in the node's region
# ---------------------------------------------------------------------------

# Its own subnet in the workers' network (network.tf): nodes, pods and services ranges,
# Private Google Access (no NAT: nodes reach Google APIs and the node API, not the internet).
resource "google_compute_subnetwork" "gke" {
  for_each                 = local.gke_nodes
  name                     = "${var.name_prefix}-gke-${each.key}"
  region                   = local.node_region[each.key]
  network                  = google_compute_network.workers.id
  ip_cidr_range            = var.gke_cidrs[each.key].nodes
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.gke_cidrs[each.key].pods
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.gke_cidrs[each.key].services
  }

  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# The nodes' own identity: logs, metrics and image pulls only. Workers never run as it
# (Workload Identity: pods get their node's worker identity through their KSA).
resource "google_service_account" "gke_nodes" {
  count        = var.gke_enabled ? 1 : 0
  account_id   = "${var.name_prefix}-gke-nodes"
  display_name = "fedpipe GKE nodes (logs, metrics, image pulls)"

  depends_on = [google_project_service.api]
}

resource "google_container_cluster" "workers" {
  for_each    = local.gke_nodes
  name        = "${var.name_prefix}-${each.key}"
  location    = local.node_region[each.key]
  description = "fedpipe workers of node ${each.key} (TPU and GPU node pools)"
  network     = google_compute_network.workers.id
  subnetwork  = google_compute_subnetwork.gke[each.key].id

  # Node pools are separate resources; the default pool goes at once.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = var.deletion_protection
  resource_labels          = merge(var.labels, { node = each.key })

  release_channel {
    channel = "REGULAR"
  }

  workload_identity_config {
    workload_pool = local.workload_pool
  }

  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # Private nodes; the control plane's IP endpoint is private too. The hub's
  # launcher reaches the control plane at its DNS endpoint, where IAM, not the
  # caller's address, decides (the hub's container.developer below).
  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = true
    master_ipv4_cidr_block  = var.gke_cidrs[each.key].control_plane
  }

  control_plane_endpoints_config {
    dns_endpoint_config {
      allow_external_traffic = true
    }
  }

  master_authorized_networks_config {
    gcp_public_cidrs_access_enabled = false
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  # Every pod's image is checked against the project's Binary Authorization policy
  # (the default policy admits all images: README says how to hold it to fedpipe's repository).
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  # Dataplane V2 enforces network policies (no separate network_policy block: that is the legacy Calico add-on).
  datapath_provider           = "ADVANCED_DATAPATH"
  enable_shielded_nodes       = true
  enable_intranode_visibility = true
  enable_legacy_abac          = false

  node_config {
    service_account = google_service_account.gke_nodes[0].email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  lifecycle {
    precondition {
      condition     = contains(keys(var.gke_cidrs), each.key) && contains(keys(var.gke_zones), each.key)
      error_message = "gke_enabled: node ${each.key} needs gke_cidrs[\"${each.key}\"] and gke_zones[\"${each.key}\"]."
    }
    precondition {
      condition     = startswith(lookup(var.gke_zones, each.key, "-"), "${local.node_region[each.key]}-")
      error_message = "gke_zones[\"${each.key}\"] must be a zone of the node's region ${local.node_region[each.key]}."
    }
    # The node pools change node_config; the default pool is gone.
    ignore_changes = [node_config]
  }

  depends_on = [google_project_service.accelerators, google_project_iam_member.gke_nodes]
}

locals {
  # What every fedpipe node pool's machines share: their identity, Workload Identity's
  # metadata server, shielded boot, and labels the launchers select pools by.
  gke_node_metadata = { disable-legacy-endpoints = "true" }
}

# kube-dns, the JobSet controller and other system pods: the accelerator pools are tainted.
resource "google_container_node_pool" "system" {
  for_each       = local.gke_nodes
  name           = "system"
  cluster        = google_container_cluster.workers[each.key].id
  location       = local.node_region[each.key]
  node_locations = [var.gke_zones[each.key]]

  autoscaling {
    min_node_count = 1
    max_node_count = 3
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.gke_system_machine_type
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.gke_nodes[0].email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = { "fedpipe/pool" = "system" }
    resource_labels = merge(var.labels, { node = each.key, pool = "system" })
    metadata        = local.gke_node_metadata

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

resource "google_container_node_pool" "tpu" {
  for_each       = var.gke_tpu.enabled ? local.gke_nodes : {}
  name           = "tpu"
  cluster        = google_container_cluster.workers[each.key].id
  location       = local.node_region[each.key]
  node_locations = [var.gke_zones[each.key]]

  # From 0: a TPU host exists only while a job's pod wants it. A multi-host slice
  # scales as a whole (0 or max_nodes hosts).
  initial_node_count = 0
  autoscaling {
    min_node_count = 0
    max_node_count = var.gke_tpu.max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  dynamic "placement_policy" {
    for_each = var.gke_tpu.topology == null ? [] : [var.gke_tpu.topology]
    content {
      type         = "COMPACT"
      tpu_topology = placement_policy.value
    }
  }

  node_config {
    machine_type    = var.gke_tpu.machine_type
    image_type      = "COS_CONTAINERD"
    spot            = var.gke_tpu.spot
    service_account = google_service_account.gke_nodes[0].email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    # GKE taints TPU nodes (google.com/tpu) itself; the launcher's pods tolerate it.
    labels          = { "fedpipe/pool" = "tpu" }
    resource_labels = merge(var.labels, { node = each.key, pool = "tpu" })
    metadata        = local.gke_node_metadata

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

resource "google_container_node_pool" "gpu" {
  for_each       = var.gke_gpu.enabled ? local.gke_nodes : {}
  name           = "gpu"
  cluster        = google_container_cluster.workers[each.key].id
  location       = local.node_region[each.key]
  node_locations = [var.gke_zones[each.key]]

  initial_node_count = 0
  autoscaling {
    min_node_count = 0
    max_node_count = var.gke_gpu.max_nodes
    # Flex-start (and spot) capacity is wherever the zone has it.
    location_policy = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.gke_gpu.machine_type
    image_type      = "COS_CONTAINERD"
    spot            = var.gke_gpu.spot
    flex_start      = var.gke_gpu.flex_start
    service_account = google_service_account.gke_nodes[0].email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    # GKE taints GPU nodes (nvidia.com/gpu) itself; the launcher's pods tolerate it.
    labels          = { "fedpipe/pool" = "gpu" }
    resource_labels = merge(var.labels, { node = each.key, pool = "gpu" })
    metadata        = local.gke_node_metadata

    guest_accelerator {
      type  = var.gke_gpu.accelerator
      count = var.gke_gpu.accelerator_count
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    # DWS flex-start takes no reservation.
    dynamic "reservation_affinity" {
      for_each = var.gke_gpu.flex_start ? ["NO_RESERVATION"] : []
      content {
        consume_reservation_type = reservation_affinity.value
      }
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# ---------------------------------------------------------------------------
# Grants
# ---------------------------------------------------------------------------

# GKE's node service account: the one project-level role GKE documents for a
# least-privilege node identity (logs, metrics), and image pulls from our repository only.
resource "google_project_iam_member" "gke_nodes" {
  for_each = var.gke_enabled ? toset(["roles/container.defaultNodeServiceAccount"]) : toset([])
  project  = var.project
  role     = each.value
  member   = "serviceAccount:${google_service_account.gke_nodes[0].email}"
}

resource "google_artifact_registry_repository_iam_member" "gke_nodes_pull_images" {
  for_each   = var.gke_enabled ? toset(["images"]) : toset([])
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.gke_nodes[0].email}"
}

# Workload Identity: the node's Kubernetes service account (and no other) may act as
# the node's worker identity, so its pods get exactly what "Who can do what" gives it.
resource "google_service_account_iam_member" "worker_ksa" {
  for_each           = local.gke_nodes
  service_account_id = google_service_account.worker[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.gke_ksa_member[each.key]
}

# The hub launches, polls and stops Kubernetes Jobs and JobSets. GKE's IAM roles
# exist on the project only (Kubernetes RBAC could narrow it to the namespace).
resource "google_project_iam_member" "hub_launches_on_gke" {
  for_each = var.gke_enabled ? toset(["gke"]) : toset([])
  project  = var.project
  role     = "roles/container.developer"
  member   = local.hub_member
}

# Vertex AI custom jobs: aiplatform.user (project-level only: a job does not exist
# before it is created); the job runs as the node's worker identity, which the hub
# may attach thanks to confidential.tf's actAs grant on the worker accounts only.
resource "google_project_iam_member" "hub_launches_on_vertex" {
  for_each = var.vertex_enabled ? toset(["vertex"]) : toset([])
  project  = var.project
  role     = "roles/aiplatform.user"
  member   = local.hub_member
}

# ---------------------------------------------------------------------------
# What the launchers are told
# ---------------------------------------------------------------------------
# With any backend on, the launching functions (on_job_written launches, on_tick polls and
# stops: both run as the hub) get FEDPIPE_LAUNCHER=cloud (main.tf, local.launcher_env): the
# routing launcher hands each job to Cloud Run, GKE, Vertex AI or Batch by its accelerator,
# and each engine's launcher reads what is here (shared/launchers/routing.py, fleet.py,
# gke.py, vertex.py, batch_gpu.py; tests/unit/test_infra_launchers.py checks the names).

locals {
  # routing.RoutingPolicy: an engine that is not enabled gets no jobs unless named (then the
  # functions' precondition refuses the plan); with neither TPU engine on, TPU jobs are refused.
  accelerator_tpu_backend = coalesce(var.tpu_backend, var.gke_enabled ? "gke" : var.vertex_enabled ? "vertex" : "gke")
  accelerator_gpu_backend = coalesce(var.gpu_backend, var.gke_enabled ? "gke" : var.batch_enabled ? "batch" : var.vertex_enabled ? "vertex" : "gke")

  accelerator_launcher_env = local.accelerators_enabled ? merge(
    {
      FEDPIPE_TPU_BACKEND             = local.accelerator_tpu_backend
      FEDPIPE_GPU_BACKEND             = local.accelerator_gpu_backend
      FEDPIPE_WORKER_SERVICE_ACCOUNTS = join(",", [for node, sa in google_service_account.worker : "${node}=${sa.email}"])
      FEDPIPE_WORKER_ENV              = jsonencode(local.worker_env)
      FEDPIPE_NAME_PREFIX             = var.name_prefix # Batch subnets and run names (fleet.Fleet.infra_prefix)
    },
    # Only the kinds with an image: the engines refuse a kind without one.
    { for name, image in {
      FEDPIPE_WORKER_IMAGE_CPU = var.accelerator_image_cpu
      FEDPIPE_WORKER_IMAGE_GPU = var.accelerator_image_gpu
      FEDPIPE_WORKER_IMAGE_TPU = var.accelerator_image_tpu
    } : name => image if image != null },
    var.accelerator_max_run_seconds == null ? {} : { FEDPIPE_MAX_RUN_SECONDS = tostring(var.accelerator_max_run_seconds) },
    var.gke_enabled ? {
      # Each node's cluster at its DNS endpoint (gke.connect: https://<endpoint>, IAM decides).
      FEDPIPE_GKE_CLUSTERS        = join(",", [for node, c in google_container_cluster.workers : "${node}=${c.control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint}"])
      FEDPIPE_GKE_NAMESPACE       = var.gke_namespace
      FEDPIPE_GKE_SERVICE_ACCOUNT = join(",", [for node, ksa in local.gke_ksa : "${node}=${ksa}" if contains(keys(local.gke_nodes), node)])
    } : {},
  ) : {}
}

output "accelerator_launcher_env" {
  description = "What the routing launcher (FEDPIPE_LAUNCHER=cloud) reads, as the launching functions get it (main.tf local.launcher_env: the Cloud Run engine's settings too); null when no backend is enabled."
  value       = local.accelerators_enabled ? local.launcher_env : null
}

output "gke_clusters" {
  description = "Each node's cluster: id, DNS endpoint (what kubectl and the launcher reach) and zone of its accelerator pools."
  value = {
    for node, c in google_container_cluster.workers : node => {
      id           = c.id
      dns_endpoint = c.control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint
      zone         = var.gke_zones[node]
    }
  }
}

output "gke_manifests" {
  description = "Per node: the namespace and Kubernetes service account to apply in its cluster (`terraform output -json gke_manifests | jq -r .us | kubectl apply -f -`)."
  value = {
    for node, _ in local.gke_nodes : node => join("\n---\n", [
      yamlencode({ apiVersion = "v1", kind = "Namespace", metadata = { name = var.gke_namespace } }),
      yamlencode({
        apiVersion = "v1"
        kind       = "ServiceAccount"
        metadata = {
          name        = local.gke_ksa[node]
          namespace   = var.gke_namespace
          annotations = { "iam.gke.io/gcp-service-account" = google_service_account.worker[node].email }
        }
      }),
    ])
  }
}
