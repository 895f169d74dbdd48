# fedpipe on Google Cloud.
#
# Names come from fedpipe.auto.tfvars.json (rendered from shared.config.Settings
# and shared.triggers); this file only decides where things live and who may
# touch them. Sections:
#   1. APIs and project facts
#   2. Customer-managed keys (one key ring + key per region that holds data)
#   3. Buckets (per node, in the node's region; hub; function source)
#   4. Pub/Sub topics, the clock (Cloud Scheduler) and Firestore
#   5. Service accounts and IAM (least privilege; service agents)
#   6. Functions: one google_cloudfunctions2_function per trigger
#   7. Workers: Cloud Run jobs per node (CPU, optional GPU) and Artifact Registry
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

resource "google_kms_crypto_key_iam_member" "worker_signs_updates" {
  for_each      = var.nodes
  crypto_key_id = google_kms_crypto_key.signing[each.key].id
  role          = "roles/cloudkms.signer"
  member        = "serviceAccount:${google_service_account.worker[each.key].email}"
}

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

  depends_on = [google_project_service.api]
}

locals {
  repo_root = abspath("${path.module}/..")

  # The function source: the functions/ and shared/ packages, as in the repo.
  function_source_files = merge(
    { for f in fileset("${local.repo_root}/shared", "**/*.py") : "shared/${f}" => "${local.repo_root}/shared/${f}" },
    { for f in fileset("${local.repo_root}/functions", "**/*.py") : "functions/${f}" => "${local.repo_root}/functions/${f}" },
  )

  function_entry_points = sort(distinct([for t in var.triggers : t.function]))

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
# Topics (var.topics): shard_ready (on_raw_upload -> on_shard_ready),
# fed_rounds (the hub's round broadcasts; every federated worker pulls them
# through its own subscription), tick (Cloud Scheduler -> on_tick) and
# dead_letter.

resource "google_pubsub_topic" "topic" {
  for_each = toset(values(var.topics))
  name     = each.value
  labels   = var.labels

  depends_on = [google_project_service.api]
}

# Functions publish events they gave up on to the dead-letter topic; without a
# subscription those messages would be dropped. Inspect or replay from here.
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "${var.topics.dead_letter}-hold"
  topic                      = google_pubsub_topic.topic[var.topics.dead_letter].id
  message_retention_duration = "604800s" # 7 days, the maximum
  retain_acked_messages      = true
  ack_deadline_seconds       = 60
  labels                     = var.labels

  expiration_policy {
    ttl = "" # never expire for inactivity
  }
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

  # Ticks published before on_tick's trigger exists would have no subscription
  # and be dropped: start the clock once the functions are deployed.
  depends_on = [google_project_service.api, google_cloudfunctions2_function.fn]
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
# 5. Service accounts and IAM
# ---------------------------------------------------------------------------
# Three identities, each with only what its code does:
#   functions       runs every function and is the Eventarc trigger identity;
#   worker-<node>   one per node: reads only its own node's processed shards
#                   and the hub's global models, adds updates only under
#                   updates/<node>/ in the hub, follows round broadcasts on
#                   fed_rounds;
#   build           builds function containers (Cloud Build).
# No service-account keys: everything runs as an attached identity.

resource "google_service_account" "functions" {
  account_id   = "${var.name_prefix}-functions"
  display_name = "fedpipe functions and their Eventarc triggers"

  depends_on = [google_project_service.api]
}

resource "google_service_account" "worker" {
  for_each     = var.nodes
  account_id   = "${var.name_prefix}-worker-${each.key}"
  display_name = "fedpipe worker for node ${each.key}"

  depends_on = [google_project_service.api]
}

resource "google_service_account" "build" {
  account_id   = "${var.name_prefix}-build"
  display_name = "fedpipe function builds"

  depends_on = [google_project_service.api]
}

locals {
  functions_member = "serviceAccount:${google_service_account.functions.email}"

  # Functions read uploads, write shards/manifests/quarantine (objectUser: an
  # idempotent rewrite of the same object needs delete), and in the hub read
  # federation requests and weight updates and write global models and server
  # state (on_hub_upload, and on_tick closing rounds past their deadline).
  functions_bucket_roles = merge(
    {
      for k, b in local.node_buckets : k => {
        bucket = google_storage_bucket.node[k].name
        role   = b.kind == "raw" ? "roles/storage.objectViewer" : "roles/storage.objectUser"
      }
    },
    { hub = { bucket = google_storage_bucket.hub.name, role = "roles/storage.objectUser" } },
  )

  # A worker reads its own node's shards and the global model, and adds its
  # model/metrics (models/<job>/attempt-<n>/, in its node's processed bucket)
  # and weight update (hub) as new objects: create only, so it cannot alter
  # shards or other attempts' results. Its update's custom metadata (examples,
  # metrics) travels in the upload itself, which objects.create covers.
  # In the hub (object names: shared.federation) a worker gets two prefixes:
  #   read    federations/        global models federations/<id>/global/round-<r>
  #                               (the prefix also covers the hub's server state
  #                               federations/<id>/global/server-state-<r>, which
  #                               is derived from aggregates only; the id sits
  #                               first, so startsWith cannot exclude it);
  #   create  updates/<node>/     its own updates updates/<node>/<id>/round-<r>-a<n>.*
  #                               and nothing else.
  # The hub takes an update's node from its object name, so the per-node create
  # prefix is what stops a compromised worker from uploading an update in
  # another node's name; the trailing "/" keeps node "us" out of "us-east".
  # Neither prefix covers requests/: a worker can neither read nor drop a
  # federation request, which would start a federation over every node's data.
  # Nor can a worker read updates/ at all, its own or other nodes' (a single
  # node's update says more about its data than the aggregate does).
  worker_hub_read_prefix   = "federations/"
  worker_hub_update_prefix = { for node, _ in var.nodes : node => "updates/${node}/" }
  worker_bucket_roles = merge([
    for node, _ in var.nodes : {
      "${node}-processed-read"   = { node = node, bucket = google_storage_bucket.node["${node}-processed"].name, role = "roles/storage.objectViewer", prefix = null }
      "${node}-processed-create" = { node = node, bucket = google_storage_bucket.node["${node}-processed"].name, role = "roles/storage.objectCreator", prefix = null }
      "${node}-hub-read"         = { node = node, bucket = google_storage_bucket.hub.name, role = "roles/storage.objectViewer", prefix = local.worker_hub_read_prefix }
      "${node}-hub-create"       = { node = node, bucket = google_storage_bucket.hub.name, role = "roles/storage.objectCreator", prefix = local.worker_hub_update_prefix[node] }
    }
  ]...)
}

resource "google_storage_bucket_iam_member" "functions" {
  for_each = local.functions_bucket_roles
  bucket   = each.value.bucket
  role     = each.value.role
  member   = local.functions_member
}

resource "google_storage_bucket_iam_member" "worker" {
  for_each = local.worker_bucket_roles
  bucket   = each.value.bucket
  role     = each.value.role
  member   = "serviceAccount:${google_service_account.worker[each.value.node].email}"

  # Object-name prefix (IAM Conditions on Cloud Storage need uniform
  # bucket-level access, which every bucket here has). Listing is evaluated on
  # the bucket, so it is denied under a condition; workers fetch by name only.
  # Not verified on a real bucket: that the condition admits the resumable
  # upload google-cloud-storage switches to above 8 MiB (larger models; the
  # object name is only in the request that opens the session) as it admits a
  # single-request upload.
  dynamic "condition" {
    for_each = each.value.prefix == null ? [] : [each.value.prefix]
    content {
      title       = "only ${condition.value}"
      description = "fedpipe worker ${each.value.node}: objects under ${condition.value} only"
      expression  = "resource.name.startsWith(\"projects/_/buckets/${each.value.bucket}/objects/${condition.value}\")"
    }
  }
}

# Functions publish shard-ready events (on_raw_upload), round broadcasts
# (on_hub_upload, on_tick) and give-ups (dead letter). Not the tick topic:
# only Cloud Scheduler publishes there.
locals {
  functions_publish_topics = toset([var.topics.shard_ready, var.topics.fed_rounds, var.topics.dead_letter])
}

resource "google_pubsub_topic_iam_member" "functions_publish" {
  for_each = local.functions_publish_topics
  topic    = google_pubsub_topic.topic[each.key].id
  role     = "roles/pubsub.publisher"
  member   = local.functions_member
}

# Round broadcasts: a federated worker creates its own subscription
# fed.<federation>.<node> on fed_rounds when it starts and pulls from it
# (workers/trainer/federated.py). Creating a subscription checks two permissions:
#   - pubsub.topics.attachSubscription on the topic: roles/pubsub.subscriber on
#     fed_rounds only, so a worker can attach a subscription to no other topic;
#   - pubsub.subscriptions.create on the project (a subscription's only parent).
#     The narrowest predefined roles holding it are roles/pubsub.editor and
#     roles/pubsub.admin, which would also let a worker create and delete topics
#     and update, seek or delete every subscription: hence a custom role.
# The worker must also consume (pull, ack) its subscription. It does not exist
# before the worker creates it, so no subscription-level grant can be made in
# advance, and Pub/Sub IAM conditions cannot match resource names (only Pub/Sub
# Lite supports them): consume is granted at project level as well.
# The worker deletes its subscription when the federation ends, so finished
# federations do not leave subscriptions receiving every later broadcast (a crashed
# worker's expires after 31 days of idleness, Pub/Sub's default).
# Not granted: pubsub.subscriptions.update/get/list.
resource "google_project_iam_custom_role" "round_subscriber" {
  role_id     = "${replace(var.name_prefix, "-", "_")}_round_subscriber"
  title       = "${var.name_prefix} round-broadcast subscriber"
  description = "Create a pull subscription (topic-level pubsub.topics.attachSubscription is granted on the fed-rounds topic only), consume it, delete it."
  permissions = [
    "pubsub.subscriptions.create",
    "pubsub.subscriptions.consume",
    "pubsub.subscriptions.delete",
  ]

  depends_on = [google_project_service.api]
}

resource "google_project_iam_member" "worker_round_subscriptions" {
  for_each = var.nodes
  project  = var.project
  role     = google_project_iam_custom_role.round_subscriber.name
  member   = "serviceAccount:${google_service_account.worker[each.key].email}"
}

resource "google_pubsub_topic_iam_member" "worker_fed_rounds" {
  for_each = var.nodes
  topic    = google_pubsub_topic.topic[var.topics.fed_rounds].id
  role     = "roles/pubsub.subscriber" # attachSubscription on this topic only
  member   = "serviceAccount:${google_service_account.worker[each.key].email}"
}

# Firestore has no per-collection IAM: datastore.user is the narrowest role
# that reads and writes documents (jobs, datasets, quarantine).
resource "google_project_iam_member" "functions" {
  for_each = toset([
    "roles/datastore.user",
    "roles/eventarc.eventReceiver", # as the trigger identity, receive events
  ])
  project = var.project
  role    = each.value
  member  = local.functions_member
}

resource "google_project_iam_member" "worker_firestore" {
  for_each = var.nodes
  project  = var.project
  role     = "roles/datastore.user" # status, heartbeat and results of its job
  member   = "serviceAccount:${google_service_account.worker[each.key].email}"
}

resource "google_project_iam_member" "build" {
  project = var.project
  role    = "roles/cloudbuild.builds.builder"
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_storage_bucket_iam_member" "build_reads_source" {
  bucket = google_storage_bucket.functions_source.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.build.email}"
}

# Service agents the triggers need.
# - Cloud Storage publishes object events to Eventarc's Pub/Sub transport.
resource "google_project_iam_member" "gcs_agent_publishes_events" {
  project = var.project
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# - Pub/Sub mints the OIDC tokens that authenticate pushes to the functions
#   (granted automatically only in projects created after April 2021).
resource "google_project_service_identity" "pubsub" {
  provider = google-beta
  project  = var.project
  service  = "pubsub.googleapis.com"

  depends_on = [google_project_service.api]
}

resource "google_project_iam_member" "pubsub_agent_token_creator" {
  project = var.project
  role    = "roles/iam.serviceAccountTokenCreator"
  member  = "serviceAccount:${google_project_service_identity.pubsub.email}"
}

# - Eventarc manages the triggers' subscriptions with its own agent.
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

# ---------------------------------------------------------------------------
# 6. Functions: one per trigger
# ---------------------------------------------------------------------------
# A 2nd-gen function has exactly one event trigger, so each trigger of
# shared.triggers is one function (on_raw_upload is deployed once per node).
# Where it runs:
#   storage   in the bucket's region (the trigger must be there, and raw data
#             is processed where it lives): raw-upload-<node> in the node's
#             region, hub-upload (on_hub_upload) in the hub region;
#   pubsub    in the hub region (shard-ready -> on_shard_ready, tick -> on_tick);
#   firestore in the hub region, its trigger in the database's location.
# Eventarc retries failed deliveries with backoff (RETRY_POLICY_RETRY) for up to
# 24 h; every function is idempotent, so a redelivery has no second effect.

locals {
  triggers = { for t in var.triggers : t.name => t }

  function_location = {
    for name, t in local.triggers : name => (t.kind == "storage" ? local.bucket_region[t.bucket] : var.region)
  }

  trigger_region = {
    for name, t in local.triggers : name => (t.kind == "firestore" ? local.firestore_location : local.function_location[name])
  }

  topic_ids = { for name, topic in google_pubsub_topic.topic : name => topic.id }

  # Eventarc filters per trigger (the event type is its own attribute).
  event_filters = merge(
    { for name, t in local.triggers : name => [] },
    {
      for name, t in local.triggers : name => [
        { attribute = "bucket", value = t.bucket, operator = "" },
      ] if t.kind == "storage"
    },
    {
      for name, t in local.triggers : name => [
        { attribute = "database", value = google_firestore_database.db.name, operator = "" },
        { attribute = "document", value = t.document, operator = "match-path-pattern" },
      ] if t.kind == "firestore"
    },
  )

  # The launch function starts workers through shared.launchers.cloud_run.
  worker_job_base = "${var.name_prefix}-worker"
  # (shared.launchers.select reads FEDPIPE_LAUNCHER; the project and hub region
  # come from var.settings_env.)
  launcher_env = {
    FEDPIPE_LAUNCHER     = "cloud-run"
    FEDPIPE_WORKER_JOB   = local.worker_job_base
    FEDPIPE_NODE_REGIONS = join(",", [for node, region in local.node_region : "${node}=${region}"])
    GOOGLE_CLOUD_PROJECT = var.project # client libraries' default project
  }
}

resource "google_cloudfunctions2_function" "fn" {
  for_each    = local.triggers
  name        = "${var.name_prefix}-${each.key}"
  location    = local.function_location[each.key]
  description = "${each.value.function}: ${each.value.kind} trigger ${each.key}"
  labels      = merge(var.labels, { trigger = each.key })

  build_config {
    runtime         = var.functions_runtime
    entry_point     = each.value.function
    service_account = google_service_account.build.id
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
    ingress_settings               = "ALLOW_INTERNAL_ONLY" # only Eventarc calls them
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.functions.email
    environment_variables          = merge(var.settings_env, local.launcher_env, { FEDPIPE_TRIGGER = each.key })
  }

  event_trigger {
    event_type            = each.value.event_type
    trigger_region        = local.trigger_region[each.key]
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.functions.email
    pubsub_topic          = each.value.kind == "pubsub" ? lookup(local.topic_ids, each.value.topic, null) : null

    dynamic "event_filters" {
      for_each = local.event_filters[each.key]
      content {
        attribute = event_filters.value.attribute
        value     = event_filters.value.value
        operator  = event_filters.value.operator == "" ? null : event_filters.value.operator
      }
    }
  }

  lifecycle {
    precondition {
      condition     = each.value.kind != "pubsub" || contains(keys(local.topic_ids), coalesce(each.value.topic, "-"))
      error_message = "Trigger ${each.key} listens to a topic that var.topics does not create."
    }
  }

  depends_on = [
    google_project_service.api,
    # Storage triggers name their bucket by a plain string (var.triggers), so
    # the buckets they watch (node raw buckets, the hub) are explicit here.
    google_storage_bucket.node,
    google_storage_bucket.hub,
    google_project_iam_member.functions,
    google_project_iam_member.build,
    google_storage_bucket_iam_member.build_reads_source,
    google_project_iam_member.gcs_agent_publishes_events,
    google_project_iam_member.pubsub_agent_token_creator,
    google_project_iam_member.eventarc_agent,
  ]
}

# A 2nd-gen function is a Cloud Run service: its trigger identity needs
# run.invoker on that service only (not project-wide).
resource "google_cloud_run_service_iam_member" "trigger_invokes_function" {
  for_each = google_cloudfunctions2_function.fn
  project  = var.project
  location = each.value.location
  service  = each.value.service_config[0].service
  role     = "roles/run.invoker"
  member   = local.functions_member
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
          for_each = merge(var.settings_env, { FEDPIPE_NODE = each.key, FEDPIPE_SIGNING_KEY = "${google_kms_crypto_key.signing[each.key].id}/cryptoKeyVersions/1" })
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
          for_each = merge(var.settings_env, { FEDPIPE_NODE = each.key, FEDPIPE_SIGNING_KEY = "${google_kms_crypto_key.signing[each.key].id}/cryptoKeyVersions/1" })
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

# The functions may start (with overrides) exactly these jobs, nothing else.
resource "google_cloud_run_v2_job_iam_member" "functions_run_worker" {
  for_each = merge(
    google_cloud_run_v2_job.worker,
    { for node, job in google_cloud_run_v2_job.worker_gpu : "${node}-gpu" => job },
  )
  project  = var.project
  location = each.value.location
  name     = each.value.name
  role     = "roles/run.jobsExecutorWithOverrides"
  member   = local.functions_member
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
  function_services = [for name, _ in local.triggers : "\"${var.name_prefix}-${name}\""]
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

  alert_strategy {
    auto_close = "86400s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = "fedpipe: a function keeps failing (see its logs and the job documents' `error`), or a worker execution failed (the job is retried or failed by the lease watchdog)."
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
