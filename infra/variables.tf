# ---------------------------------------------------------------------------
# Names: rendered from shared.config.Settings + shared.triggers into
# fedpipe.auto.tfvars.json by `python -m shared.infra_render`. Do not edit those
# values by hand here or in the .tfvars: change Settings/triggers and re-render,
# so the local emulator wiring and production cannot drift.
# ---------------------------------------------------------------------------

variable "project" {
  description = "Google Cloud project id (Settings.project)."
  type        = string
}

variable "region" {
  description = "Hub region: hub bucket, Firestore, topics' functions, Artifact Registry (Settings.region)."
  type        = string
}

variable "nodes" {
  description = "Data-owning sites (Settings.nodes) and their bucket names."
  type = map(object({
    raw_bucket        = string
    processed_bucket  = string
    quarantine_bucket = string
  }))

  validation {
    # A node's name is spliced into its worker's IAM condition (updates/<node>/
    # in the hub) and must be one shared.federation.UPDATE_PATH can parse back.
    condition     = alltrue([for node in keys(var.nodes) : can(regex("^[A-Za-z0-9_-]+$", node))])
    error_message = "Node names: letters, digits, '_' and '-' only (they appear in update object names and IAM conditions)."
  }
}

variable "hub_bucket" {
  description = "Hub bucket: federation requests, weight updates and global models (Settings.hub_bucket)."
  type        = string
}

variable "topics" {
  description = "Pub/Sub topic names (Settings.*_topic)."
  type = object({
    shard_ready = string
    tick        = string
    dead_letter = string
  })
}

variable "collections" {
  description = "Firestore collection names (Settings.*_collection); informational, Firestore needs no declaration."
  type = object({
    jobs        = string
    datasets    = string
    quarantine  = string
    federations = string
  })
}

variable "settings_env" {
  description = "FEDPIPE_* environment that makes Settings.from_env() equal the rendered Settings; set on every function and worker."
  type        = map(string)
}

variable "triggers" {
  description = "shared.triggers.triggers(settings): one Eventarc trigger, and so one deployed function, each."
  type = list(object({
    name       = string
    function   = string # entry point in functions/main.py
    kind       = string # storage | pubsub | firestore
    event_type = string
    bucket     = optional(string)
    topic      = optional(string)
    document   = optional(string) # Firestore path pattern, e.g. "jobs/{jobId}"
  }))

  validation {
    condition     = alltrue([for t in var.triggers : contains(["storage", "pubsub", "firestore"], t.kind)])
    error_message = "Every trigger's kind must be storage, pubsub or firestore."
  }
  validation {
    condition = alltrue([
      for t in var.triggers :
      (t.kind == "storage" && t.bucket != null) || (t.kind == "pubsub" && t.topic != null) || (t.kind == "firestore" && t.document != null)
    ])
    error_message = "A storage trigger needs bucket, a pubsub trigger topic, a firestore trigger document."
  }
}

# ---------------------------------------------------------------------------
# Deployment choices (not in Settings).
# ---------------------------------------------------------------------------

variable "node_regions" {
  description = "Region of each node: its buckets, its KMS key, its upload function and its workers stay there (data sovereignty). Every node in var.nodes needs one."
  type        = map(string)
  default = {
    us = "us-central1"
    eu = "europe-west4"
  }
}

variable "name_prefix" {
  description = "Prefix of functions, jobs, service accounts and key rings."
  type        = string
  default     = "fedpipe"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,14}$", var.name_prefix))
    error_message = "name_prefix: 2-15 lowercase letters, digits or hyphens, starting with a letter (service account ids are limited to 30 characters)."
  }
}

variable "labels" {
  description = "Labels on every labelled resource."
  type        = map(string)
  default     = { app = "fedpipe" }
}

variable "firestore_database" {
  description = "Firestore database id; the code uses the default database."
  type        = string
  default     = "(default)"
}

variable "firestore_location" {
  description = "Firestore location (a region or nam5/eur3); null = var.region. Firestore triggers must be in this location."
  type        = string
  default     = null
}

variable "kms_rotation_period" {
  description = "Rotation period of the data keys (CMEK), in seconds with an 's' suffix."
  type        = string
  default     = "7776000s" # 90 days
}

variable "kek_rotation_period" {
  description = "Rotation period of the key-encryption keys (one per node, one for the hub; shared/envelope.py), in seconds with an 's' suffix. Older versions still decrypt."
  type        = string
  default     = "2592000s" # 30 days

  validation {
    condition     = can(regex("^[0-9]+s$", var.kek_rotation_period)) && try(tonumber(trimsuffix(var.kek_rotation_period, "s")) >= 86400 && tonumber(trimsuffix(var.kek_rotation_period, "s")) <= 2592000, false)
    error_message = "kek_rotation_period is between 1 day (Cloud KMS's minimum) and 30 days, e.g. \"2592000s\"."
  }
}

variable "quarantine_retention_days" {
  description = "Days before quarantined uploads are deleted."
  type        = number
  default     = 30
}

variable "checkpoint_retention_days" {
  description = "Days before a job's training checkpoints (checkpoints/ in each processed bucket) are deleted: longer than any job runs."
  type        = number
  default     = 14
  validation {
    condition     = var.checkpoint_retention_days >= 1 && var.checkpoint_retention_days <= 365
    error_message = "checkpoint_retention_days must be 1 to 365."
  }
}

variable "noncurrent_retention_days" {
  description = "Days an overwritten or deleted object version is kept (every data bucket is versioned)."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_retention_days >= 1 && var.noncurrent_retention_days <= 3650
    error_message = "noncurrent_retention_days: 1 to 3650."
  }
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete non-empty buckets (development projects only)."
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Protect the Firestore database and the Cloud Run jobs from deletion."
  type        = bool
  default     = true
}

# Functions.

variable "functions_runtime" {
  description = "Cloud Functions runtime; the project needs Python >= 3.11."
  type        = string
  default     = "python311"
}

variable "function_memory" {
  description = "Memory of each function instance (preprocessing reads CSV/Parquet with pyarrow)."
  type        = string
  default     = "1Gi"
}

variable "function_timeout_seconds" {
  description = "Event-driven functions may run at most 540 s."
  type        = number
  default     = 540
}

variable "function_max_instances" {
  description = "Upper bound on instances per function (cost and Firestore contention guard)."
  type        = number
  default     = 10
}

# Event delivery (delivery.tf).

variable "max_delivery_attempts" {
  description = "Deliveries of one event before Pub/Sub moves it to the dead-letter topic (Pub/Sub allows 5-100)."
  type        = number
  default     = 5

  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100 && floor(var.max_delivery_attempts) == var.max_delivery_attempts
    error_message = "max_delivery_attempts: a whole number from 5 to 100 (Pub/Sub's bounds)."
  }
}

variable "eventarc_dead_letter" {
  description = "Give each Eventarc trigger's subscription (storage and Firestore triggers) a dead-letter policy with gcloud (scripts/eventarc-dead-letter.sh; needs gcloud where terraform runs)."
  type        = bool
  default     = true
}

# The clock (Cloud Scheduler -> tick topic -> on_tick).

variable "tick_schedule" {
  description = "Cron schedule (UTC) of the tick that reaps expired job leases and closes federation rounds past their deadline; lease and deadline checks are only as timely as this."
  type        = string
  default     = "* * * * *" # every minute
}

# Workers (Cloud Run Jobs).

variable "worker_subnet_cidrs" {
  description = "IP range of each node's worker subnet (Direct VPC egress, Private Google Access). Every node in var.nodes needs one."
  type        = map(string)
  default = {
    us = "10.8.0.0/24"
    eu = "10.8.1.0/24"
  }

  validation {
    condition     = alltrue([for cidr in values(var.worker_subnet_cidrs) : can(cidrhost(cidr, 0))])
    error_message = "worker_subnet_cidrs: every value must be an IPv4 CIDR range."
  }
}

variable "worker_image" {
  description = "Trainer image (workers/trainer/Dockerfile); null = <region>-docker.pkg.dev/<project>/<name_prefix>/trainer:<worker_image_tag>. Push it before the first apply."
  type        = string
  default     = null
}

variable "worker_gpu_image" {
  description = "Trainer image with CUDA JAX for the GPU jobs; null = the .../trainer-gpu:<worker_image_tag> image."
  type        = string
  default     = null
}

variable "worker_image_tag" {
  description = "Tag of the default worker images."
  type        = string
  default     = "latest"
}

variable "worker_cpu" {
  description = "CPUs of a CPU worker task (1, 2, 4, 6 or 8)."
  type        = string
  default     = "2"
}

variable "worker_memory" {
  description = "Memory of a CPU worker task."
  type        = string
  default     = "4Gi"
}

variable "worker_task_timeout" {
  description = "Longest run of one worker task before Cloud Run kills it (the launcher may override per execution)."
  type        = string
  default     = "3600s"
}

variable "gpu_worker_enabled" {
  description = "Create the <worker>-<node>-gpu jobs (needs Cloud Run GPU quota in every node region)."
  type        = bool
  default     = false
}

variable "gpu_accelerator" {
  description = "Cloud Run GPU type of the GPU worker jobs."
  type        = string
  default     = "nvidia-l4"
}

# Monitoring and budget.

variable "alert_email" {
  description = "E-mail for alerts and budget notices; null = none."
  type        = string
  default     = null
}

variable "alert_notification_channels" {
  description = "Existing Monitoring notification channel ids to alert as well."
  type        = list(string)
  default     = []
}

variable "billing_account" {
  description = "Billing account id (XXXXXX-XXXXXX-XXXXXX) for the budget; null = no budget."
  type        = string
  default     = null
}

variable "budget_amount" {
  description = "Monthly budget, in whole units of budget_currency."
  type        = number
  default     = 500
}

variable "budget_currency" {
  description = "Currency of the budget; must be the billing account's currency."
  type        = string
  default     = "USD"
}

variable "key_release" {
  description = "Per node: the audience of its workers' attestation tokens and the attribute condition rendered by shared.key_release.terraform_vars. Empty: no pool, nothing released. Rendered by `python -m shared.infra_render` from FEDPIPE_WORKER_IMAGE_DIGESTS."
  type = map(object({
    audience            = string
    attribute_condition = string
  }))

  validation {
    condition     = alltrue([for node in keys(var.key_release) : can(regex("^[a-z0-9-]{1,12}$", node))])
    error_message = "key_release nodes: 1-12 lowercase letters, digits or hyphens (they name a workload identity pool, at most 32 characters)."
  }
}
