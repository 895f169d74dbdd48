# Confidential workers (issue 9, part 4): what shared/launchers/confidential_space.py
# (Confidential Space VMs, CPU and flex-start H100) and shared/launchers/batch.py
# (Cloud Batch on confidential VMs) need. Everything here is off unless
# var.confidential_workers is true; README.md "Confidential workers" says why each
# grant is what it is.
#
# The launchers build their requests themselves (VM name, image family, metadata,
# zone, subnet, identity); the only resource they reference by name is the Batch
# instance template below, because batch_v1 has no confidential-computing field.

variable "confidential_workers" {
  description = "Create what the confidential launchers need (APIs, Batch templates, grants). Off by default: it adds project-level grants (README)."
  type        = bool
  default     = false
}

variable "confidential_worker_image" {
  description = "The trainer image for confidential workers, pinned by digest (REGISTRY/PATH@sha256:<64 hex>): a key-release policy allowlists digests, and a tag can move. Required with confidential_workers."
  type        = string
  default     = null

  validation {
    condition     = var.confidential_worker_image == null || can(regex("^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+@sha256:[0-9a-f]{64}$", var.confidential_worker_image))
    error_message = "confidential_worker_image must be pinned by digest: REGISTRY/PATH@sha256:<64 lowercase hex>, no tag."
  }
}

variable "confidential_worker_gpu_image" {
  description = "The CUDA trainer image for confidential H100 workers, pinned by digest; null = GPU jobs are refused by the confidential launcher."
  type        = string
  default     = null

  validation {
    condition     = var.confidential_worker_gpu_image == null || can(regex("^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+@sha256:[0-9a-f]{64}$", var.confidential_worker_gpu_image))
    error_message = "confidential_worker_gpu_image must be pinned by digest: REGISTRY/PATH@sha256:<64 lowercase hex>, no tag."
  }
}

variable "confidential_zones" {
  description = "Zone of each node's confidential VMs, in the node's region, where its machine type (and, for GPU jobs, a3-highgpu-1g) is offered. Every node needs one."
  type        = map(string)
  default = {
    us = "us-central1-a"
    eu = "europe-west4-a"
  }
}

variable "confidential_tee" {
  description = "Confidential computing technology of CPU workers: SEV_SNP (n2d machine types) or TDX (c3)."
  type        = string
  default     = "SEV_SNP"

  validation {
    condition     = contains(["SEV_SNP", "TDX"], var.confidential_tee)
    error_message = "confidential_tee: SEV_SNP or TDX."
  }
}

variable "confidential_machine_type" {
  description = "Machine type of CPU confidential workers: n2d-* for SEV_SNP, c3-* for TDX."
  type        = string
  default     = "n2d-standard-4"
}

variable "confidential_batch_image" {
  description = "Boot image of the confidential Batch VMs (Batch's Container-Optimized OS image by default). It must boot as a guest of confidential_tee (guestOsFeatures SEV_SNP_CAPABLE / TDX_CAPABLE)."
  type        = string
  default     = "projects/batch-custom-image/global/images/family/batch-cos-stable-official"
}

locals {
  confidential_nodes = var.confidential_workers ? var.nodes : {}

  # The launchers name VMs "<prefix>-cs-..." and Batch jobs "<prefix>-cb-..."
  # (shared.launchers.confidential_space.resource_name); the hub's compute grant
  # is limited to the VM prefix.
  confidential_vm_prefix = "${var.name_prefix}-cs-"

  confidential_min_cpu_platform = var.confidential_tee == "SEV_SNP" ? "AMD Milan" : null

  # Project-level roles the worker identities need on confidential VMs; none
  # exists on a narrower resource (README, "Confidential workers").
  confidential_worker_roles = [
    "roles/confidentialcomputing.workloadUser", # Confidential Space attestation tokens
    "roles/logging.logWriter",                  # tee-container-log-redirect and Batch logs
    "roles/batch.agentReporter",                # the Batch agent on the VM reports as the VM's identity
  ]
  # Plain Cloud Batch workers (accelerators.tf, var.batch_enabled) need the last two as well:
  # one resource holds each binding, whichever switches ask for it.
  batch_worker_roles = ["roles/logging.logWriter", "roles/batch.agentReporter"]
  vm_worker_nodes    = var.confidential_workers || var.batch_enabled ? var.nodes : {}
  vm_worker_roles    = var.confidential_workers ? local.confidential_worker_roles : local.batch_worker_roles
  confidential_worker_grants = merge([
    for node, _ in local.vm_worker_nodes : {
      for role in local.vm_worker_roles : "${node} ${role}" => { node = node, role = role }
    }
  ]...)
}

resource "google_project_service" "confidential" {
  for_each           = var.confidential_workers ? toset(["batch.googleapis.com", "confidentialcomputing.googleapis.com"]) : toset([])
  service            = each.value
  disable_on_destroy = false
}

# One template per node for Batch (batch_v1's instance policy cannot ask for a
# confidential VM; Batch takes global templates of its own project only). The
# Confidential Space VMs need no template: their request carries everything.
resource "google_compute_instance_template" "confidential_batch" {
  for_each         = local.confidential_nodes
  name             = "${var.name_prefix}-cbatch-${each.key}" # shared.launchers.batch.instance_template_name
  description      = "fedpipe confidential Batch workers of node ${each.key}"
  machine_type     = var.confidential_machine_type
  min_cpu_platform = local.confidential_min_cpu_platform
  labels           = merge(var.labels, { node = each.key, kind = "confidential-batch" })

  confidential_instance_config {
    confidential_instance_type = var.confidential_tee
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  # SEV-SNP and TDX guests cannot live-migrate; a restarted VM would rerun the attempt.
  scheduling {
    on_host_maintenance = "TERMINATE"
    automatic_restart   = false
  }

  disk {
    source_image = var.confidential_batch_image
    boot         = true
    auto_delete  = true
    disk_type    = "pd-balanced"
    disk_size_gb = 30
  }

  # No access_config: no external IP; Google APIs through Private Google Access.
  network_interface {
    subnetwork = google_compute_subnetwork.workers[each.key].id
  }

  service_account {
    email  = google_service_account.worker[each.key].email
    scopes = ["cloud-platform"]
  }

  metadata = {
    block-project-ssh-keys = "true"
  }

  lifecycle {
    precondition {
      condition     = var.confidential_worker_image != null
      error_message = "confidential_workers needs confidential_worker_image (the trainer pinned by digest)."
    }
    precondition {
      condition     = startswith(lookup(var.confidential_zones, each.key, "-"), "${local.node_region[each.key]}-")
      error_message = "confidential_zones[\"${each.key}\"] must be a zone of the node's region ${local.node_region[each.key]}."
    }
    precondition {
      condition     = (var.confidential_tee == "SEV_SNP" && startswith(var.confidential_machine_type, "n2d-")) || (var.confidential_tee == "TDX" && startswith(var.confidential_machine_type, "c3-"))
      error_message = "confidential_machine_type ${var.confidential_machine_type} cannot run ${var.confidential_tee} (SEV_SNP: n2d-*, TDX: c3-*)."
    }
  }

  depends_on = [google_project_service.api]
}

# ---------------------------------------------------------------------------
# Grants
# ---------------------------------------------------------------------------

# The hub attaches each node's worker identity to the VMs, Batch jobs and Vertex AI
# custom jobs it creates (this file's launchers and accelerators.tf's): actAs on
# those service accounts only, never on the project.
resource "google_service_account_iam_member" "hub_acts_as_confidential_worker" {
  for_each           = var.confidential_workers || var.vertex_enabled || var.batch_enabled ? var.nodes : {}
  service_account_id = google_service_account.worker[each.key].name
  role               = "roles/iam.serviceAccountUser"
  member             = local.hub_member
}

# Creating a VM is checked on the project (the instance does not exist yet), so
# the grant is project-level, held to the launcher's instances and their boot
# disks (same name) by an IAM condition on the resource name.
resource "google_project_iam_member" "hub_creates_confidential_vms" {
  for_each = var.confidential_workers ? toset(["vms"]) : toset([])
  project  = var.project
  role     = "roles/compute.instanceAdmin.v1"
  member   = local.hub_member

  condition {
    title       = "fedpipe confidential VMs only"
    description = "Instances and boot disks named ${local.confidential_vm_prefix}* (shared.launchers.confidential_space)"
    expression  = "(resource.type == \"compute.googleapis.com/Instance\" && resource.name.extract(\"/instances/{name}\").startsWith(\"${local.confidential_vm_prefix}\")) || (resource.type == \"compute.googleapis.com/Disk\" && resource.name.extract(\"/disks/{name}\").startsWith(\"${local.confidential_vm_prefix}\"))"
  }
}

# A VM in the node's subnet needs compute.subnetworks.use on that subnet: granted
# on each worker subnet, not on the network or project (confidential VMs, and the
# Batch jobs of either kind).
resource "google_compute_subnetwork_iam_member" "hub_uses_worker_subnet" {
  for_each   = var.confidential_workers || var.batch_enabled ? var.nodes : {}
  project    = var.project
  region     = google_compute_subnetwork.workers[each.key].region
  subnetwork = google_compute_subnetwork.workers[each.key].name
  role       = "roles/compute.networkUser"
  member     = local.hub_member
}

# Batch has no job-level IAM (a job does not exist before it is created):
# creating one needs batch.jobs.create on the project (confidential Batch, and plain
# Batch with accelerators.tf's batch_enabled).
resource "google_project_iam_member" "hub_runs_confidential_batch" {
  for_each = var.confidential_workers || var.batch_enabled ? toset(["batch"]) : toset([])
  project  = var.project
  role     = "roles/batch.jobsEditor"
  member   = local.hub_member
}

resource "google_project_iam_member" "confidential_worker" {
  for_each = local.confidential_worker_grants
  project  = var.project
  role     = each.value.role
  member   = "serviceAccount:${google_service_account.worker[each.value.node].email}"
}

# What the functions that launch need (merge into main.tf's launcher_env when
# FEDPIPE_LAUNCHER selects a confidential launcher): read by
# shared.launchers.confidential_space.ConfidentialConfig.from_env.
output "confidential_launcher_env" {
  description = "FEDPIPE_CONFIDENTIAL_* environment of the launching functions; null unless confidential_workers."
  value = var.confidential_workers ? {
    FEDPIPE_CONFIDENTIAL_ZONES        = join(",", [for node, _ in var.nodes : "${node}=${var.confidential_zones[node]}"])
    FEDPIPE_CONFIDENTIAL_IMAGE        = var.confidential_worker_image
    FEDPIPE_CONFIDENTIAL_GPU_IMAGE    = var.confidential_worker_gpu_image == null ? "" : var.confidential_worker_gpu_image
    FEDPIPE_CONFIDENTIAL_TEE          = var.confidential_tee
    FEDPIPE_CONFIDENTIAL_MACHINE_TYPE = var.confidential_machine_type
    FEDPIPE_CONFIDENTIAL_WORKER_ENV   = jsonencode(local.worker_env)
    FEDPIPE_NAME_PREFIX               = var.name_prefix
  } : null
}
