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
  description = "Identities of functions, workers and builds."
  value = {
    functions = google_service_account.functions.email
    build     = google_service_account.build.email
    workers   = { for node, sa in google_service_account.worker : node => sa.email }
    # Custom role letting workers create and consume their fed-rounds subscriptions.
    worker_subscription_role = google_project_iam_custom_role.round_subscriber.name
  }
}

output "data_keys" {
  description = "CMEK key per region."
  value       = { for region, key in google_kms_crypto_key.data : region => key.id }
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
