# fedpipe on Google Cloud.
#
# Names come from fedpipe.auto.tfvars.json (rendered from shared.config.Settings
# and shared.triggers); this file only decides where things live and who may
# touch them. Sections:
#   1. APIs and project facts
#   2. Keys: one key ring per region that holds data, its data key (CMEK), and
#      the key-encryption keys (one per node, one for the hub)
#   3. Buckets (per node, in the node's region; hub; function source)
#   4. Pub/Sub topics, the clock (Cloud Scheduler) and Firestore
#   5. (iam.tf) Service accounts and IAM: one identity per role and per node
#   6. Functions: one google_cloudfunctions2_function per trigger, and the node API
#      (how events reach them and where failures go: delivery.tf)
#   7. Workers: Cloud Run jobs per node (CPU, optional GPU) and Artifact Registry
#      (their network: network.tf)
#   8. Monitoring alert and budget

# ---------------------------------------------------------------------------
# 1. APIs and project facts
# ---------------------------------------------------------------------------

locals {
  apis = toset(concat(
    [
      "artifactregistry.googleapis.com",
      "cloudbuild.googleapis.com",
      "cloudfunctions.googleapis.com",
      "cloudkms.googleapis.com",
      "cloudscheduler.googleapis.com",
      "compute.googleapis.com",
      "eventarc.googleapis.com",
      "firestore.googleapis.com",
      "iam.googleapis.com",
      "logging.googleapis.com",
      "monitoring.googleapis.com",
      "pubsub.googleapis.com",
      "run.googleapis.com",
      "storage.googleapis.com",
    ],
    var.billing_account == null ? [] : ["billingbudgets.googleapis.com"],
  ))
}

resource "google_project_service" "api" {
  for_each = local.apis
  service  = each.value
  # Other workloads in the project may use these APIs too.
  disable_on_destroy = false
}

data "google_project" "this" {
  project_id = var.project
}

locals {
  # Fails with "Invalid index" naming the node if var.node_regions lacks one:
  # a node without a declared region must not silently land in the hub region.
  node_region = { for node, _ in var.nodes : node => var.node_regions[node] }

  # Every per-node bucket, keyed "<node>-<kind>".
  node_buckets = merge([
    for node, b in var.nodes : {
      "${node}-raw"        = { node = node, kind = "raw", name = b.raw_bucket, region = local.node_region[node] }
      "${node}-processed"  = { node = node, kind = "processed", name = b.processed_bucket, region = local.node_region[node] }
      "${node}-quarantine" = { node = node, kind = "quarantine", name = b.quarantine_bucket, region = local.node_region[node] }
    }
  ]...)

  bucket_region = merge(
    { for k, b in local.node_buckets : b.name => b.region },
    { (var.hub_bucket) = var.region },
  )

  # Regions holding data, each gets a key ring and a data key.
  kms_regions = toset(concat(values(local.node_region), [var.region]))

  firestore_location = coalesce(var.firestore_location, var.region)
}

# ---------------------------------------------------------------------------
# 2. Customer-managed encryption keys
# ---------------------------------------------------------------------------
# A key must live in the same location as the bucket it protects, so every
# region that holds data gets its own key ring. Key rings cannot be deleted:
# re-creating the stack reuses the names.

resource "google_kms_key_ring" "data" {
  for_each = local.kms_regions
  name     = var.name_prefix
  location = each.key

  depends_on = [google_project_service.api]
}

resource "google_kms_crypto_key" "data" {
  for_each        = local.kms_regions
  name            = "${var.name_prefix}-data"
  key_ring        = google_kms_key_ring.data[each.key].id
  purpose         = "ENCRYPT_DECRYPT"
  rotation_period = var.kms_rotation_period
  labels          = var.labels

  lifecycle {
    # Destroying a key makes every object it encrypted unreadable.
    prevent_destroy = true
  }
}

# Cloud Storage encrypts with the key on our behalf: its service agent (not
# our service accounts) needs encrypt/decrypt on each data key.
data "google_storage_project_service_account" "gcs" {
  depends_on = [google_project_service.api]
}

resource "google_kms_crypto_key_iam_member" "gcs_uses_data_key" {
  for_each      = local.kms_regions
  crypto_key_id = google_kms_crypto_key.data[each.key].id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# Each node signs its weight updates with its own Ed25519 key, held in KMS in the
# node's region: the private key never leaves KMS, only the node's worker may
# sign with it, and the hub admits an update only if it verifies against the key
# registered for that node (`fedpipe nodes register NODE --kms <version>`).
resource "google_kms_crypto_key" "signing" {
  for_each = var.nodes
  name     = "${var.name_prefix}-${each.key}-signing"
  key_ring = google_kms_key_ring.data[local.node_region[each.key]].id
  purpose  = "ASYMMETRIC_SIGN"
  labels   = merge(var.labels, { node = each.key })

  version_template {
    algorithm = "EC_SIGN_ED25519"
  }

  lifecycle {
    prevent_destroy = true
  }
}

# Without confidential workers, the node's worker service account signs. With them, the key
# is released like the node's KEK, only to an attested workload: the signer role goes to
# the node's pool instead (attestation.tf, attested_signs_updates), never to the service
# account, which Cloud Run jobs, GKE pods and Vertex AI or Batch jobs also run as.
resource "google_kms_crypto_key_iam_member" "worker_signs_updates" {
  for_each      = var.confidential_workers ? {} : var.nodes
  crypto_key_id = google_kms_crypto_key.signing[each.key].id
  role          = "roles/cloudkms.signer"
  member        = "serviceAccount:${google_service_account.worker[each.key].email}"
}

# Key-encryption keys (shared/envelope.py): what fedpipe stores is sealed with a
# fresh data key per object, wrapped by its owner's KEK. One KEK per node, in the
# node's region (its shards and its weight updates), and the hub's, in the hub
# region (global models, server-optimizer state). Separate from the data keys
# above, which only Cloud Storage and Pub/Sub use (CMEK). Owner "hub" is
# shared.envelope.HUB, so no node may be called that.
locals {
  kek_region = merge(
    { for node, _ in var.nodes : node => local.node_region[node] },
    { hub = var.region },
  )
  # FEDPIPE_NODE_KEKS (shared.config.Settings.node_keks): "<owner>=gcp-kms://<key>" for
  # every node and the hub, Tink's URI for a Cloud KMS key.
  node_keks = join(",", [for owner, key in google_kms_crypto_key.kek : format("%s=gcp-kms://%s", owner, key.id)])
  kek_env   = { FEDPIPE_NODE_KEKS = local.node_keks }
}

resource "google_kms_crypto_key" "kek" {
  for_each        = local.kek_region
  name            = "${var.name_prefix}-${each.key}-kek"
  key_ring        = google_kms_key_ring.data[each.value].id
  purpose         = "ENCRYPT_DECRYPT"
  rotation_period = var.kek_rotation_period
  labels          = merge(var.labels, { owner = each.key, kind = "kek" })

  lifecycle {
    # Destroying a KEK makes every object sealed under it unreadable.
    prevent_destroy = true
    precondition {
      condition     = !contains(keys(var.nodes), "hub")
      error_message = "\"hub\" is the hub's key owner (shared.envelope.HUB): no node may be named hub."
    }
  }
}

# Each node's ingest seals its shards under its own node's KEK: encrypt only.
resource "google_kms_crypto_key_iam_member" "ingest_seals_shards" {
  for_each      = var.nodes
  crypto_key_id = google_kms_crypto_key.kek[each.key].id
  role          = "roles/cloudkms.cryptoKeyEncrypter"
  member        = "serviceAccount:${google_service_account.ingest[each.key].email}"
}

# The hub opens each node's weight updates: decrypt only on the node KEKs.
resource "google_kms_crypto_key_iam_member" "hub_opens_updates" {
  for_each      = var.nodes
  crypto_key_id = google_kms_crypto_key.kek[each.key].id
  role          = "roles/cloudkms.cryptoKeyDecrypter"
  member        = local.hub_member
}

# The hub seals and opens global models and server-optimizer state under its own KEK
# (the node API opens global models to serve them).
resource "google_kms_crypto_key_iam_member" "hub_uses_hub_kek" {
  crypto_key_id = google_kms_crypto_key.kek["hub"].id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = local.hub_member
}
# Workers get nothing here: their node's KEK is released only to attested
# workers, through the node's workload identity pool (attestation.tf).

# ---------------------------------------------------------------------------
# 3. Buckets
# ---------------------------------------------------------------------------

resource "google_storage_bucket" "node" {
  for_each = local.node_buckets
  name     = each.value.name
  # Raw data never leaves the node's region: bucket, key and the function
  # that reads it are all there.
  location = each.value.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets
  labels                      = merge(var.labels, { node = each.value.node, kind = each.value.kind })

  encryption {
    default_kms_key_name = google_kms_crypto_key.data[each.value.region].id
  }

  # An overwritten or deleted object stays recoverable for a while.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }

  dynamic "lifecycle_rule" {
    for_each = each.value.kind == "quarantine" ? [var.quarantine_retention_days] : []
    content {
      condition {
        age = lifecycle_rule.value
      }
      action {
        type = "Delete"
      }
    }
  }

  # A job's training checkpoints (workers/trainer/checkpoints.py) matter only while it may resume.
  dynamic "lifecycle_rule" {
    for_each = each.value.kind == "processed" ? [var.checkpoint_retention_days] : []
    content {
      condition {
        age            = lifecycle_rule.value
        matches_prefix = ["checkpoints/"]
      }
      action {
        type = "Delete"
      }
    }
  }

  # Creating a CMEK bucket fails unless the GCS agent can already use the key.
  depends_on = [google_kms_crypto_key_iam_member.gcs_uses_data_key]
}

resource "google_storage_bucket" "hub" {
  name     = var.hub_bucket
  location = var.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets
  labels                      = merge(var.labels, { kind = "hub" })

  encryption {
    default_kms_key_name = google_kms_crypto_key.data[var.region].id
  }

  # Global models and weight updates are the federation's results: keep
  # overwritten or deleted versions recoverable.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.gcs_uses_data_key]
}

# Function source archives (code only, no data: Google-managed encryption).
resource "google_storage_bucket" "functions_source" {
  name     = "${var.hub_bucket}-fn-source"
  location = var.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true
  labels                      = merge(var.labels, { kind = "functions-source" })

  versioning {
    enabled = true
  }

  # Content-addressed archives: older ones are only needed for a rollback.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.api]
}

locals {
  repo_root = abspath("${path.module}/..")

  # The function source: the functions/ and shared/ packages, as in the repo.
  function_source_files = merge(
    { for f in fileset("${local.repo_root}/shared", "**/*.py") : "shared/${f}" => "${local.repo_root}/shared/${f}" },
    { for f in fileset("${local.repo_root}/functions", "**/*.py") : "functions/${f}" => "${local.repo_root}/functions/${f}" },
  )

  # The node API is an HTTP function, not a trigger.
  node_api_entry_point  = "node_api"
  function_entry_points = sort(distinct(concat([for t in var.triggers : t.function], [local.node_api_entry_point])))

  # The Python runtime loads main.py from the source root; re-export the entry
  # points of functions/main.py there, so the repo layout stays as it is.
  root_main_py = join("\n", concat(
    ["# Generated by infra/main.tf: Cloud Functions loads main.py from the source root."],
    [for f in local.function_entry_points : "from functions.main import ${f}  # noqa: F401"],
    [""],
  ))
}

data "archive_file" "functions_source" {
  type        = "zip"
  output_path = "${path.module}/build/functions-source.zip"

  source {
    filename = "main.py"
    content  = local.root_main_py
  }

  source {
    filename = "requirements.txt"
    content  = file("${local.repo_root}/functions/requirements.txt")
  }

  dynamic "source" {
    for_each = local.function_source_files
    content {
      filename = source.key
      content  = file(source.value)
    }
  }
}

resource "google_storage_bucket_object" "functions_source" {
  # Content-addressed name: a code change is a new object, so the functions redeploy.
  name   = "functions-source-${data.archive_file.functions_source.output_md5}.zip"
  bucket = google_storage_bucket.functions_source.name
  source = data.archive_file.functions_source.output_path
}

# ---------------------------------------------------------------------------
# 4. Pub/Sub, the clock and Firestore
# ---------------------------------------------------------------------------
# Topics (var.topics): shard_ready (on_raw_upload -> on_shard_ready), tick
# (Cloud Scheduler -> on_tick) and dead_letter (Pub/Sub moves events there after
# their retry budget, delivery.tf). Workers hear of rounds through the node API,
# not Pub/Sub. Storage events travel on Eventarc's own topics (delivery.tf).

resource "google_pubsub_topic" "topic" {
  for_each     = toset(values(var.topics))
  name         = each.value
  labels       = var.labels
  kms_key_name = google_kms_crypto_key.data[var.region].id

  message_storage_policy {
    allowed_persistence_regions = [var.region]
  }

  depends_on = [google_project_service.api, google_kms_crypto_key_iam_member.pubsub_uses_data_key]
}

# The clock: what must happen on time rather than on an event (reap jobs whose
# lease expired, close federation rounds past their deadline) runs in on_tick,
# which listens to the tick topic. Cloud Scheduler publishes to it through its
# own service agent (no identity of ours is involved). A missed or failed tick
# is harmless: the next one does the same work.
resource "google_cloud_scheduler_job" "tick" {
  name        = "${var.name_prefix}-tick"
  region      = var.region
  description = "fedpipe clock: on_tick reaps expired job leases and closes federation rounds past their deadline"
  schedule    = var.tick_schedule
  time_zone   = "Etc/UTC"

  pubsub_target {
    topic_name = google_pubsub_topic.topic[var.topics.tick].id
    # A Pub/Sub message needs non-empty data or an attribute; on_tick reads neither.
    data = base64encode("tick")
  }

  # Ticks published before on_tick's subscription exists would be dropped:
  # start the clock once the functions' subscriptions are there.
  depends_on = [google_project_service.api, google_pubsub_subscription.trigger]
}

resource "google_firestore_database" "db" {
  name        = var.firestore_database
  location_id = local.firestore_location
  type        = "FIRESTORE_NATIVE"

  delete_protection_state = var.deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  # `terraform destroy` leaves the job history in place unless asked otherwise.
  deletion_policy = var.deletion_protection ? "ABANDON" : "DELETE"

  depends_on = [google_project_service.api]
}

# ---------------------------------------------------------------------------
# 6. Functions: one per trigger, and the node API
# ---------------------------------------------------------------------------
# A 2nd-gen function serves one trigger, so each trigger of shared.triggers is
# one function (on_raw_upload is deployed once per node). Where it runs:
#   storage   in the bucket's region (raw data is processed where it lives):
#             raw-upload-<node> in the node's region, hub-upload in the hub region;
#   pubsub    in the hub region (shard-ready -> on_shard_ready, tick -> on_tick);
#   firestore in the hub region, its Eventarc trigger in the database's location.
# As whom it runs: a function watching a node's raw bucket runs as that node's
# ingest identity; every other function as the hub. Storage and Firestore events
# arrive by Eventarc (google.cloud.storage.object.v1.finalized and
# google.cloud.firestore.document.v1.written, the CloudEvents the local router
# reproduces), Pub/Sub events by our own push subscriptions (delivery.tf); both
# retry with backoff, then dead-letter. Every function is idempotent, so a
# redelivery has no second effect.

locals {
  triggers = { for t in var.triggers : t.name => t }

  function_location = {
    for name, t in local.triggers : name => (t.kind == "storage" ? local.bucket_region[t.bucket] : var.region)
  }

  # raw bucket -> its node; a trigger on it belongs to that node.
  raw_bucket_node = { for node, b in var.nodes : b.raw_bucket => node }
  trigger_node = {
    for name, t in local.triggers : name => (t.kind == "storage" ? lookup(local.raw_bucket_node, t.bucket, null) : null)
  }
  function_identity = {
    for name, node in local.trigger_node : name => (node == null ? google_service_account.hub.email : google_service_account.ingest[node].email)
  }

  # Every region that runs a function has its own image repository (builds push there).
  function_regions = toset(concat(values(local.function_location), [var.region]))

  # Storage and Firestore triggers are Eventarc triggers (delivery.tf says why).
  # A storage trigger lives in its bucket's region (Eventarc requires it for a
  # single-region bucket), the Firestore trigger in the database's location.
  eventarc_triggers = { for name, t in local.triggers : name => t if t.kind != "pubsub" }
  trigger_region = {
    for name, t in local.eventarc_triggers : name => (t.kind == "firestore" ? local.firestore_location : local.bucket_region[t.bucket])
  }

  # Eventarc filters per trigger (the event type is its own attribute).
  event_filters = merge(
    {
      for name, t in local.eventarc_triggers : name => [
        { attribute = "bucket", value = t.bucket, operator = null },
      ] if t.kind == "storage"
    },
    {
      for name, t in local.eventarc_triggers : name => [
        { attribute = "database", value = google_firestore_database.db.name, operator = null },
        { attribute = "document", value = t.document, operator = "match-path-pattern" },
      ] if t.kind == "firestore"
    },
  )

  # The node API's deterministic Cloud Run URL: https://<service>-<project number>.<region>.run.app.
  # It is the audience workers request their ID tokens for and the one the node
  # API checks (FEDPIPE_NODE_API_URL); the function's own service_config.uri
  # cannot be fed back into its environment (a cycle).
  node_api_name = "${var.name_prefix}-node-api"
  node_api_url  = "https://${local.node_api_name}-${data.google_project.this.number}.${var.region}.run.app"

  # The functions that launch (on_job_written) and follow and stop runs (on_tick) pick their
  # launcher with shared.launchers.select (FEDPIPE_LAUNCHER): the Cloud Run jobs below, or,
  # with any accelerator backend on, the routing launcher over Cloud Run, GKE, Vertex AI and
  # Batch (accelerators.tf). The project and hub region come from var.settings_env.
  worker_job_base = "${var.name_prefix}-worker"
  launcher_env = merge(
    {
      FEDPIPE_LAUNCHER     = local.accelerators_enabled ? "cloud" : "cloud-run"
      FEDPIPE_WORKER_JOB   = local.worker_job_base
      FEDPIPE_NODE_REGIONS = join(",", [for node, region in local.node_region : "${node}=${region}"])
      GOOGLE_CLOUD_PROJECT = var.project # client libraries' default project
    },
    local.accelerator_launcher_env,
  )

  # Every hub function (not the nodes' raw-upload ones) gets the same environment, so
  # on_tick stops runs with the launcher on_job_written started them with; with attested
  # aggregation, where the aggregator is and who the hub is (aggregator.tf).
  hub_function_env = merge(local.launcher_env, local.hub_aggregator_env)
}

resource "google_artifact_registry_repository" "functions" {
  for_each      = local.function_regions
  location      = each.key
  repository_id = "${var.name_prefix}-functions"
  format        = "DOCKER"
  description   = "fedpipe function images (Cloud Build pushes here as the build identity)"
  labels        = var.labels

  depends_on = [google_project_service.api]
}

resource "google_cloudfunctions2_function" "fn" {
  for_each    = local.triggers
  name        = "${var.name_prefix}-${each.key}"
  location    = local.function_location[each.key]
  description = "${each.value.function}: ${each.value.kind} trigger ${each.key}"
  labels      = merge(var.labels, { trigger = each.key })

  build_config {
    runtime           = var.functions_runtime
    entry_point       = each.value.function
    service_account   = google_service_account.build.id
    docker_repository = google_artifact_registry_repository.functions[local.function_location[each.key]].id
    source {
      storage_source {
        bucket = google_storage_bucket.functions_source.name
        object = google_storage_bucket_object.functions_source.name
      }
    }
  }

  service_config {
    available_memory               = var.function_memory
    timeout_seconds                = var.function_timeout_seconds
    min_instance_count             = 0 # scale to zero
    max_instance_count             = var.function_max_instances
    ingress_settings               = "ALLOW_INTERNAL_ONLY" # only Pub/Sub pushes and Eventarc call them
    all_traffic_on_latest_revision = true
    service_account_email          = local.function_identity[each.key]
    environment_variables = merge(
      var.settings_env,
      local.trigger_node[each.key] == null ? local.hub_function_env : {},
      local.kek_env,
      { FEDPIPE_TRIGGER = each.key },
    )
    # With attested aggregation, the hub's functions reach the aggregator's private address
    # through the hub's connector (aggregator.tf); Google APIs stay on the direct path.
    vpc_connector                 = local.trigger_node[each.key] == null ? local.hub_vpc_connector : null
    vpc_connector_egress_settings = local.trigger_node[each.key] == null && local.hub_vpc_connector != null ? "PRIVATE_RANGES_ONLY" : null
  }

  # Storage and Firestore events come through Eventarc, with the delivery
  # identity as trigger identity; Pub/Sub events through our own push
  # subscriptions (delivery.tf), so those functions have no event trigger.
  dynamic "event_trigger" {
    for_each = each.value.kind != "pubsub" ? [each.value] : []
    content {
      event_type            = event_trigger.value.event_type
      trigger_region        = local.trigger_region[each.key]
      retry_policy          = "RETRY_POLICY_RETRY"
      service_account_email = google_service_account.delivery.email

      dynamic "event_filters" {
        for_each = local.event_filters[each.key]
        content {
          attribute = event_filters.value.attribute
          value     = event_filters.value.value
          operator  = event_filters.value.operator
        }
      }
    }
  }

  lifecycle {
    precondition {
      condition     = each.value.kind != "pubsub" || contains(values(var.topics), coalesce(each.value.topic, "-"))
      error_message = "Trigger ${each.key} listens to a topic that var.topics does not create."
    }
    precondition {
      condition     = each.value.function != "on_raw_upload" || local.trigger_node[each.key] != null
      error_message = "Trigger ${each.key} runs on_raw_upload on a bucket that is no node's raw bucket."
    }
    # An engine named for TPU or GPU jobs must exist (accelerators.tf).
    precondition {
      condition     = var.tpu_backend == null || (var.tpu_backend == "gke" ? var.gke_enabled : var.vertex_enabled)
      error_message = "tpu_backend = \"${coalesce(var.tpu_backend, "-")}\" names an engine that is not enabled (gke_enabled / vertex_enabled)."
    }
    precondition {
      condition     = var.gpu_backend == null || (var.gpu_backend == "gke" ? var.gke_enabled : var.gpu_backend == "batch" ? var.batch_enabled : var.vertex_enabled)
      error_message = "gpu_backend = \"${coalesce(var.gpu_backend, "-")}\" names an engine that is not enabled (gke_enabled / batch_enabled / vertex_enabled)."
    }
  }

  depends_on = [
    google_project_service.api,
    # Storage triggers name their bucket by a plain string (var.triggers), so
    # the buckets they watch (node raw buckets, the hub) are explicit here.
    google_storage_bucket.node,
    google_storage_bucket.hub,
    # Their identities may use the KEKs before the first event arrives.
    google_kms_crypto_key_iam_member.ingest_seals_shards,
    google_kms_crypto_key_iam_member.hub_opens_updates,
    google_kms_crypto_key_iam_member.hub_uses_hub_kek,
    google_storage_bucket_iam_member.build_reads_source,
    google_artifact_registry_repository_iam_member.build_pushes_images,
    google_project_iam_member.build_writes_logs,
    google_project_iam_member.delivery_receives_events,
    google_project_iam_member.eventarc_agent,
    google_project_iam_member.gcs_agent_publishes_events,
    google_service_account_iam_member.pubsub_agent_signs_as_delivery,
  ]
}

# A 2nd-gen function is a Cloud Run service: the delivery identity may invoke
# the event-driven ones, each on its own service (not project-wide).
resource "google_cloud_run_service_iam_member" "delivery_invokes_function" {
  for_each = google_cloudfunctions2_function.fn
  project  = var.project
  location = each.value.location
  service  = each.value.service_config[0].service
  role     = "roles/run.invoker"
  member   = local.delivery_member
}

# The node API (functions/main.py node_api, an HTTP function): workers report
# on their jobs and fetch round state and global models here, with a
# Google-signed ID token whose audience is this service's deterministic URL
# (local.node_api_url, FEDPIPE_NODE_API_URL on both sides). Internal ingress:
# only from the workers' VPC (network.tf) and Google's own services.
resource "google_cloudfunctions2_function" "node_api" {
  name        = local.node_api_name
  location    = var.region
  description = "${local.node_api_entry_point}: the workers' only way to the hub (authenticated HTTP)"
  labels      = merge(var.labels, { function = "node-api" })

  build_config {
    runtime           = var.functions_runtime
    entry_point       = local.node_api_entry_point
    service_account   = google_service_account.build.id
    docker_repository = google_artifact_registry_repository.functions[var.region].id
    source {
      storage_source {
        bucket = google_storage_bucket.functions_source.name
        object = google_storage_bucket_object.functions_source.name
      }
    }
  }

  service_config {
    available_memory = var.function_memory
    # Long polls for round changes hold a request open (at most 30 s; the worker asks
    # again), so one instance serves many at once: concurrency needs a whole CPU.
    available_cpu                    = "1"
    max_instance_request_concurrency = 80
    timeout_seconds                  = var.function_timeout_seconds
    min_instance_count               = 0
    max_instance_count               = var.function_max_instances
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.hub.email
    # The audience it checks: its own URL, which Terraform cannot read back into it. With attested
    # aggregation it relays the aggregator's attested key to members, through the hub's connector.
    environment_variables         = merge(var.settings_env, local.kek_env, local.hub_aggregator_env, { FEDPIPE_NODE_API_URL = local.node_api_url })
    vpc_connector                 = local.hub_vpc_connector
    vpc_connector_egress_settings = local.hub_vpc_connector == null ? null : "PRIVATE_RANGES_ONLY"
  }

  lifecycle {
    precondition {
      # Cloud Run gives a service its deterministic URL only while
      # "<service>-<project number>" fits a 63-character DNS label.
      condition     = length("${local.node_api_name}-${data.google_project.this.number}") <= 63
      error_message = "The node API's deterministic URL needs <name_prefix>-node-api-<project number> within 63 characters: shorten name_prefix."
    }
  }

  depends_on = [
    google_project_service.api,
    google_storage_bucket_iam_member.build_reads_source,
    google_artifact_registry_repository_iam_member.build_pushes_images,
    google_project_iam_member.build_writes_logs,
    google_kms_crypto_key_iam_member.hub_uses_hub_kek, # it opens global models to serve them
  ]
}

# Each node's worker may call the node API (and no other function); the API
# maps the caller's verified identity to its node.
resource "google_cloud_run_service_iam_member" "worker_invokes_node_api" {
  for_each = var.nodes
  project  = var.project
  location = google_cloudfunctions2_function.node_api.location
  service  = google_cloudfunctions2_function.node_api.service_config[0].service
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.worker[each.key].email}"
}

# ---------------------------------------------------------------------------
# 7. Workers: Cloud Run jobs, one per node, in the node's region
# ---------------------------------------------------------------------------
# The launcher runs <worker>-<node> (CPU) or <worker>-<node>-gpu with per-
# execution env overrides (FEDPIPE_JOB_ID, FEDPIPE_JOB_ATTEMPT). Cloud Run's
# own task retries are off: the job queue owns retries (a new attempt number
# per retry), and a silent Cloud Run retry would run one attempt twice.

resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = var.name_prefix
  format        = "DOCKER"
  description   = "fedpipe worker images"
  labels        = var.labels

  depends_on = [google_project_service.api]
}

locals {
  image_base       = "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
  worker_image     = coalesce(var.worker_image, "${local.image_base}/trainer:${var.worker_image_tag}")
  worker_gpu_image = coalesce(var.worker_gpu_image, "${local.image_base}/trainer-gpu:${var.worker_image_tag}")

  # What a worker is told: its node, its signing key, the KEKs (it may use its
  # node's only once attested), and where the node API is (it reaches the hub
  # through nothing else); with attested aggregation, the aggregator images its
  # node trusts to seal updates to (aggregator.tf).
  worker_env = {
    for node, _ in var.nodes : node => merge(
      var.settings_env,
      local.kek_env,
      {
        FEDPIPE_NODE         = node
        FEDPIPE_SIGNING_KEY  = "${google_kms_crypto_key.signing[node].id}/cryptoKeyVersions/1"
        FEDPIPE_NODE_API_URL = local.node_api_url
        # In Confidential Space: the node's pool provider, whose STS credentials use its KEK and its signing key
        # (workers/trainer/keys.py, signing_key.py).
        FEDPIPE_KEY_RELEASE_PROVIDER = contains(keys(var.key_release), node) ? google_iam_workload_identity_pool_provider.attested[node].name : ""
      },
      # workers/trainer/update_seal.py: "sha256:...,sha256:...", the node's own choice.
      var.attested_aggregation ? { FEDPIPE_AGGREGATOR_IMAGE_DIGESTS = join(",", local.aggregator_trusted_digests[node]) } : {},
    )
  }
}

resource "google_cloud_run_v2_job" "worker" {
  for_each            = var.nodes
  name                = "${local.worker_job_base}-${each.key}"
  location            = local.node_region[each.key]
  deletion_protection = var.deletion_protection
  labels              = merge(var.labels, { node = each.key, accelerator = "cpu" })

  template {
    task_count  = 1
    parallelism = 1

    template {
      service_account       = google_service_account.worker[each.key].email
      timeout               = var.worker_task_timeout
      max_retries           = 0
      execution_environment = "EXECUTION_ENVIRONMENT_GEN2"

      # All egress through the node's subnet: the node API admits internal traffic only.
      vpc_access {
        egress = "ALL_TRAFFIC"
        network_interfaces {
          network    = google_compute_network.workers.id
          subnetwork = google_compute_subnetwork.workers[each.key].id
        }
      }

      containers {
        name  = "trainer" # shared.launchers.cloud_run.CONTAINER_NAME
        image = local.worker_image

        resources {
          limits = {
            cpu    = var.worker_cpu
            memory = var.worker_memory
          }
        }

        dynamic "env" {
          for_each = local.worker_env[each.key]
          content {
            name  = env.key
            value = env.value
          }
        }
      }
    }
  }

  depends_on = [google_project_service.api]
}

resource "google_cloud_run_v2_job" "worker_gpu" {
  # Switched off by default: Cloud Run GPUs need quota in each node region.
  for_each            = var.gpu_worker_enabled ? var.nodes : {}
  name                = "${local.worker_job_base}-${each.key}-gpu"
  location            = local.node_region[each.key]
  deletion_protection = var.deletion_protection
  labels              = merge(var.labels, { node = each.key, accelerator = "gpu" })

  template {
    task_count  = 1
    parallelism = 1

    template {
      service_account       = google_service_account.worker[each.key].email
      timeout               = var.worker_task_timeout
      max_retries           = 0
      execution_environment = "EXECUTION_ENVIRONMENT_GEN2"

      # All egress through the node's subnet: the node API admits internal traffic only.
      vpc_access {
        egress = "ALL_TRAFFIC"
        network_interfaces {
          network    = google_compute_network.workers.id
          subnetwork = google_compute_subnetwork.workers[each.key].id
        }
      }

      # The GPU is part of the template, which run overrides cannot change:
      # that is why GPU work has its own job resource.
      node_selector {
        accelerator = var.gpu_accelerator
      }

      containers {
        name  = "trainer"
        image = local.worker_gpu_image

        resources {
          # Cloud Run GPU instances need at least 4 CPUs and 16 GiB.
          limits = {
            cpu              = "4"
            memory           = "16Gi"
            "nvidia.com/gpu" = "1"
          }
        }

        dynamic "env" {
          for_each = local.worker_env[each.key]
          content {
            name  = env.key
            value = env.value
          }
        }
      }
    }
  }

  depends_on = [google_project_service.api]
}

# The hub (on_job_written) may start (with overrides) exactly these jobs, nothing else.
resource "google_cloud_run_v2_job_iam_member" "hub_runs_worker" {
  for_each = merge(
    google_cloud_run_v2_job.worker,
    { for node, job in google_cloud_run_v2_job.worker_gpu : "${node}-gpu" => job },
  )
  project  = var.project
  location = each.value.location
  name     = each.value.name
  role     = "roles/run.jobsExecutorWithOverrides"
  member   = local.hub_member
}

# ---------------------------------------------------------------------------
# 8. Monitoring and budget
# ---------------------------------------------------------------------------

resource "google_monitoring_notification_channel" "email" {
  count        = var.alert_email == null ? 0 : 1
  display_name = "${var.name_prefix} alerts"
  type         = "email"
  labels = {
    email_address = var.alert_email
  }

  depends_on = [google_project_service.api]
}

locals {
  alert_channels = concat(var.alert_notification_channels, google_monitoring_notification_channel.email[*].id)

  # A 2nd-gen function's Cloud Run service has the function's name.
  function_services = concat(
    [for name, _ in local.triggers : "\"${var.name_prefix}-${name}\""],
    ["\"${google_cloudfunctions2_function.node_api.name}\""],
  )
  worker_jobs = concat(
    [for node, _ in var.nodes : "\"${local.worker_job_base}-${node}\""],
    var.gpu_worker_enabled ? [for node, _ in var.nodes : "\"${local.worker_job_base}-${node}-gpu\""] : [],
  )
}

resource "google_monitoring_alert_policy" "errors" {
  display_name          = "${var.name_prefix}: function errors or failed workers"
  combiner              = "OR"
  notification_channels = local.alert_channels

  # A function that fails answers 5xx and Eventarc retries it; a burst of them
  # means an event is stuck in retries (or poison) and needs a look.
  conditions {
    display_name = "Function 5xx responses"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_revision\" AND metric.type = \"run.googleapis.com/request_count\" AND metric.labels.response_code_class = \"5xx\" AND resource.labels.service_name = one_of(${join(", ", local.function_services)})"
      comparison      = "COMPARISON_GT"
      threshold_value = 5
      duration        = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.labels.service_name"]
      }
    }
  }

  conditions {
    display_name = "Failed worker executions"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_job\" AND metric.type = \"run.googleapis.com/job/completed_execution_count\" AND metric.labels.result = \"failed\" AND resource.labels.job_name = one_of(${join(", ", local.worker_jobs)})"
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.labels.job_name"]
      }
    }
  }

  # An event that failed every delivery attempt is on the dead-letter topic:
  # `fedpipe events tail --project <project>` shows which and why.
  conditions {
    display_name = "Events dead-lettered"
    condition_threshold {
      filter          = "resource.type = \"pubsub_topic\" AND metric.type = \"pubsub.googleapis.com/topic/send_message_operation_count\" AND resource.labels.topic_id = \"${var.topics.dead_letter}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
    }
  }

  alert_strategy {
    auto_close = "86400s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = "fedpipe: a function keeps failing (see its logs and the job documents' `error`), an event was dead-lettered after its retry budget (`fedpipe events tail --project <project>`), or a worker execution failed (the job is retried or failed by the lease watchdog)."
  }

  depends_on = [google_project_service.api]
}

resource "google_billing_budget" "monthly" {
  count           = var.billing_account == null ? 0 : 1
  billing_account = var.billing_account
  display_name    = "${var.name_prefix} ${var.project}"

  budget_filter {
    projects = ["projects/${data.google_project.this.number}"]
  }

  amount {
    specified_amount {
      currency_code = var.budget_currency
      units         = tostring(var.budget_amount)
    }
  }

  threshold_rules {
    threshold_percent = 0.5
  }
  threshold_rules {
    threshold_percent = 0.9
  }
  threshold_rules {
    threshold_percent = 1.0
    spend_basis       = "FORECASTED_SPEND"
  }

  dynamic "all_updates_rule" {
    for_each = length(local.alert_channels) > 0 ? [local.alert_channels] : []
    content {
      monitoring_notification_channels = all_updates_rule.value
    }
  }

  depends_on = [google_project_service.api]
}
