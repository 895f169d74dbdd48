output "functions" {
  description = "Deployed function per trigger: name, region, entry point."
  value = {
    for name, fn in google_cloudfunctions2_function.fn : name => {
      name        = fn.name
      location    = fn.location
      entry_point = local.triggers[name].function
    }
  }
}

output "buckets" {
  description = "Bucket names and regions."
  value = merge(
    { for k, b in google_storage_bucket.node : k => { name = b.name, location = b.location } },
    { hub = { name = google_storage_bucket.hub.name, location = google_storage_bucket.hub.location } },
  )
}

output "worker_jobs" {
  description = "Cloud Run jobs the launcher runs, by node (and node-gpu)."
  value = merge(
    { for node, job in google_cloud_run_v2_job.worker : node => job.id },
    { for node, job in google_cloud_run_v2_job.worker_gpu : "${node}-gpu" => job.id },
  )
}

output "topics" {
  description = "Pub/Sub topic ids by role (var.topics keys)."
  value       = { for role, name in var.topics : role => google_pubsub_topic.topic[name].id }
}

output "tick_job" {
  description = "Cloud Scheduler job publishing the tick (on_tick) and its schedule."
  value = {
    id       = google_cloud_scheduler_job.tick.id
    schedule = google_cloud_scheduler_job.tick.schedule
  }
}

output "launcher_env" {
  description = "Environment the functions get for shared.launchers.cloud_run.CloudRunJobsLauncher.from_env."
  value       = local.launcher_env
}

output "service_accounts" {
  description = "Identities: the hub, each node's ingest and worker, event delivery, builds, the attested aggregator (null unless attested_aggregation) (README: Who can do what)."
  value = {
    hub      = google_service_account.hub.email
    ingest   = { for node, sa in google_service_account.ingest : node => sa.email }
    workers  = { for node, sa in google_service_account.worker : node => sa.email }
    delivery = google_service_account.delivery.email
    build    = google_service_account.build.email
    # The attested aggregator's (aggregator.tf), with attested_aggregation.
    aggregator = var.attested_aggregation ? google_service_account.aggregator[0].email : null
  }
}

output "node_api_url" {
  description = "The node API's deterministic URL: FEDPIPE_NODE_API_URL of the workers (their ID tokens' audience) and of the node API (the audience it checks)."
  value       = local.node_api_url
}

output "dead_letter_subscription" {
  description = "Where events that failed every delivery attempt are kept: `fedpipe events tail --project <project>` reads it."
  value       = google_pubsub_subscription.dead_letter.id
}

output "trigger_subscriptions" {
  description = "The push subscription delivering each Pub/Sub trigger (dead-letter policy attached)."
  value       = { for name, sub in google_pubsub_subscription.trigger : name => sub.id }
}

output "eventarc_triggers" {
  description = "The Eventarc trigger of each storage and Firestore trigger (scripts/eventarc-dead-letter.sh gives its subscription the dead-letter policy)."
  value       = { for name, _ in local.eventarc_triggers : name => google_cloudfunctions2_function.fn[name].event_trigger[0].trigger }
}

output "data_keys" {
  description = "CMEK key per region."
  value       = { for region, key in google_kms_crypto_key.data : region => key.id }
}

output "node_keks" {
  description = "FEDPIPE_NODE_KEKS as the functions and workers get it: <owner>=gcp-kms://<key> for each node and the hub."
  value       = local.node_keks
}

output "worker_images" {
  description = "Where to push the worker images before the first apply (see README)."
  value = {
    cpu = local.worker_image
    gpu = local.worker_gpu_image
  }
}

output "signing_key_versions" {
  description = "Each node's update-signing key version: register it with `fedpipe nodes register NODE --kms <version>`."
  value       = { for node, key in google_kms_crypto_key.signing : node => "${key.id}/cryptoKeyVersions/1" }
}

output "cli_env" {
  description = "The FEDPIPE_* environment that points the `fedpipe` CLI (and `fedpipe smoke`) at this deployment: export it where the CLI runs, with Application Default Credentials."
  value       = merge(var.settings_env, { GOOGLE_CLOUD_PROJECT = var.project })
}
