# Identities and what each may touch (infra/README.md, "Who can do what").
#
#   hub            runs the hub's functions (hub-upload, shard-ready, job-written,
#                  tick, node_api): Firestore, the hub bucket, starting workers.
#                  No node bucket at all.
#   ingest-<node>  one per node: runs that node's raw-upload function; reads its
#                  node's raw bucket, writes its node's processed and quarantine
#                  buckets, publishes shard-ready. No other node's bucket.
#   worker-<node>  one per node: its node's processed shards, create-only under
#                  updates/<node>/ in the hub, its signing key, and the node API.
#                  No Firestore, no Pub/Sub, no read in the hub.
#   delivery       the identity Eventarc and the push subscriptions present to
#                  the event-driven functions (invoker on those services only).
#   build          builds the function containers.
# No service-account keys: everything runs as an attached identity. No
# project-level Pub/Sub, token-creator or Cloud Build grant for any of these
# (the one project-level Pub/Sub grant is the Cloud Storage service agent's,
# which Eventarc's Cloud Storage triggers require; below).

resource "google_service_account" "hub" {
  account_id   = "${var.name_prefix}-hub"
  display_name = "fedpipe hub functions and the node API"

  depends_on = [google_project_service.api]
}

resource "google_service_account" "ingest" {
  for_each     = var.nodes
  account_id   = "${var.name_prefix}-ingest-${each.key}"
  display_name = "fedpipe ingest for node ${each.key}"

  lifecycle {
    precondition {
      condition     = length("${var.name_prefix}-ingest-${each.key}") <= 30
      error_message = "Service account ids are at most 30 characters: shorten name_prefix or node ${each.key}."
    }
  }

  depends_on = [google_project_service.api]
}

resource "google_service_account" "worker" {
  for_each     = var.nodes
  account_id   = "${var.name_prefix}-worker-${each.key}"
  display_name = "fedpipe worker for node ${each.key}"

  lifecycle {
    precondition {
      condition     = length("${var.name_prefix}-worker-${each.key}") <= 30
      error_message = "Service account ids are at most 30 characters: shorten name_prefix or node ${each.key}."
    }
  }

  depends_on = [google_project_service.api]
}

resource "google_service_account" "delivery" {
  account_id   = "${var.name_prefix}-delivery"
  display_name = "fedpipe event delivery (Eventarc and push subscriptions)"

  depends_on = [google_project_service.api]
}

resource "google_service_account" "build" {
  account_id   = "${var.name_prefix}-build"
  display_name = "fedpipe function builds"

  depends_on = [google_project_service.api]
}

locals {
  hub_member      = "serviceAccount:${google_service_account.hub.email}"
  delivery_member = "serviceAccount:${google_service_account.delivery.email}"

  # Bucket grants by value: key => {bucket, role, member, prefix}; prefix != null
  # pins the grant to objects under it (IAM condition).
  #
  # Ingest (shared/ingest.py): lists and reads its raw bucket (objectViewer),
  # writes shards and manifests to processed and copies refused files to
  # quarantine (objectUser: an idempotent rewrite of the same object needs delete).
  ingest_bucket_roles = merge([
    for node, _ in var.nodes : {
      "${node}-raw"        = { node = node, bucket = google_storage_bucket.node["${node}-raw"].name, role = "roles/storage.objectViewer" }
      "${node}-processed"  = { node = node, bucket = google_storage_bucket.node["${node}-processed"].name, role = "roles/storage.objectUser" }
      "${node}-quarantine" = { node = node, bucket = google_storage_bucket.node["${node}-quarantine"].name, role = "roles/storage.objectUser" }
    }
  ]...)

  # A worker reads its own node's shards and adds its model and metrics
  # (models/<job>/attempt-<n>/) there as new objects: create only, so it cannot
  # alter shards or other attempts' results. In the hub it may only create
  # objects under updates/<node>/ (shared.federation.update_object): the hub takes
  # an update's node from its object name, so this prefix is what stops a
  # compromised worker from uploading in another node's name; the trailing "/"
  # keeps node "us" out of "us-east". It reads nothing in the hub: global models
  # come through the node API, so no worker sees another federation's model,
  # a federation request, or another node's update.
  worker_hub_update_prefix = { for node, _ in var.nodes : node => "updates/${node}/" }
  worker_bucket_roles = merge([
    for node, _ in var.nodes : {
      "${node}-processed-read"   = { node = node, bucket = google_storage_bucket.node["${node}-processed"].name, role = "roles/storage.objectViewer", prefix = null }
      "${node}-processed-create" = { node = node, bucket = google_storage_bucket.node["${node}-processed"].name, role = "roles/storage.objectCreator", prefix = null }
      "${node}-hub-create"       = { node = node, bucket = google_storage_bucket.hub.name, role = "roles/storage.objectCreator", prefix = local.worker_hub_update_prefix[node] }
    }
  ]...)
}

# The hub reads federation requests and weight updates and writes global models
# and server state (on_hub_upload, on_tick, node_api). No node bucket.
resource "google_storage_bucket_iam_member" "hub" {
  bucket = google_storage_bucket.hub.name
  role   = "roles/storage.objectUser"
  member = local.hub_member
}

resource "google_storage_bucket_iam_member" "ingest" {
  for_each = local.ingest_bucket_roles
  bucket   = each.value.bucket
  role     = each.value.role
  member   = "serviceAccount:${google_service_account.ingest[each.value.node].email}"
}

resource "google_storage_bucket_iam_member" "worker" {
  for_each = local.worker_bucket_roles
  bucket   = each.value.bucket
  role     = each.value.role
  member   = "serviceAccount:${google_service_account.worker[each.value.node].email}"

  # Object-name prefix (IAM Conditions on Cloud Storage need uniform
  # bucket-level access, which every bucket here has). Not verified on a real
  # bucket: that the condition admits the resumable upload google-cloud-storage
  # switches to above 8 MiB as it admits a single-request upload.
  dynamic "condition" {
    for_each = each.value.prefix == null ? [] : [each.value.prefix]
    content {
      title       = "only ${condition.value}"
      description = "fedpipe worker ${each.value.node}: objects under ${condition.value} only"
      expression  = "resource.name.startsWith(\"projects/_/buckets/${each.value.bucket}/objects/${condition.value}\")"
    }
  }
}

# Only ingest publishes shard-ready; nothing of ours publishes ticks (Cloud
# Scheduler does) or dead letters (Pub/Sub does, below).
resource "google_pubsub_topic_iam_member" "ingest_publishes_shard_ready" {
  for_each = var.nodes
  topic    = google_pubsub_topic.topic[var.topics.shard_ready].id
  role     = "roles/pubsub.publisher"
  member   = "serviceAccount:${google_service_account.ingest[each.key].email}"
}

# Firestore has no per-collection IAM: datastore.user is the narrowest role that
# reads and writes documents, for the hub and for every node's ingest (its file
# records, data sets and quarantine entries). Workers get no Firestore role.
resource "google_project_iam_member" "firestore" {
  for_each = merge(
    { hub = local.hub_member },
    { for node, sa in google_service_account.ingest : "ingest-${node}" => "serviceAccount:${sa.email}" },
  )
  project = var.project
  role    = "roles/datastore.user"
  member  = each.value
}

# The trigger identity of the Eventarc (storage and Firestore) triggers receives
# their events; the role exists only at project level.
resource "google_project_iam_member" "delivery_receives_events" {
  project = var.project
  role    = "roles/eventarc.eventReceiver"
  member  = local.delivery_member
}

# Builds: logs (no narrower resource than the project), the function source,
# and the images, in our own per-region repositories (build_config.docker_repository).
resource "google_project_iam_member" "build_writes_logs" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_storage_bucket_iam_member" "build_reads_source" {
  bucket = google_storage_bucket.functions_source.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.build.email}"
}

resource "google_artifact_registry_repository_iam_member" "build_pushes_images" {
  for_each   = google_artifact_registry_repository.functions
  location   = each.value.location
  repository = each.value.name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.build.email}"
}

# ---------------------------------------------------------------------------
# Service agents
# ---------------------------------------------------------------------------

# Eventarc's Cloud Storage triggers: Cloud Storage's service agent publishes the
# object events to the transport topic Eventarc creates for each trigger. Eventarc
# documents this grant on the project (roles/pubsub.publisher for the Cloud
# Storage service agent, a prerequisite of creating a Cloud Storage trigger); the
# topic does not exist before the trigger does, so there is no narrower resource
# to grant it on. Google's agent, not a fedpipe identity.
resource "google_project_iam_member" "gcs_agent_publishes_events" {
  project = var.project
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

resource "google_project_service_identity" "pubsub" {
  provider = google-beta
  project  = var.project
  service  = "pubsub.googleapis.com"

  depends_on = [google_project_service.api]
}

locals {
  pubsub_agent_member = "serviceAccount:${google_project_service_identity.pubsub.email}"
}

# Pub/Sub mints the OIDC tokens of pushes (ours and Eventarc's) as the delivery
# identity: token creator on that one service account, not on the project.
resource "google_service_account_iam_member" "pubsub_agent_signs_as_delivery" {
  service_account_id = google_service_account.delivery.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent_member
}

# Pub/Sub encrypts topics with the data key of their region (CMEK).
resource "google_kms_crypto_key_iam_member" "pubsub_uses_data_key" {
  for_each      = local.kms_regions
  crypto_key_id = google_kms_crypto_key.data[each.key].id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = local.pubsub_agent_member
}

resource "google_project_service_identity" "eventarc" {
  provider = google-beta
  project  = var.project
  service  = "eventarc.googleapis.com"

  depends_on = [google_project_service.api]
}

resource "google_project_iam_member" "eventarc_agent" {
  project = var.project
  role    = "roles/eventarc.serviceAgent"
  member  = "serviceAccount:${google_project_service_identity.eventarc.email}"
}

# Data Access audit logs: who read or wrote which object, key or document. Firestore's
# are configured under datastore.googleapis.com (its audit logging documentation: that
# name configures both, and the entries then carry firestore.googleapis.com).
resource "google_project_iam_audit_config" "data_access" {
  for_each = toset(["storage.googleapis.com", "cloudkms.googleapis.com", "datastore.googleapis.com"])
  project  = var.project
  service  = each.value

  audit_log_config {
    log_type = "DATA_READ"
  }
  audit_log_config {
    log_type = "DATA_WRITE"
  }
}
