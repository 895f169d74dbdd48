# How events reach the functions, and where they go when they cannot.
#
# Production delivers the same CloudEvents as the local router, to the same
# handlers, so each trigger kind keeps the transport that yields its event type:
#   storage   Eventarc storage trigger (google.cloud.storage.object.v1.finalized,
#             filter bucket = the trigger's bucket; main.tf, event_trigger)
#   firestore Eventarc Firestore trigger (google.cloud.firestore.document.v1.written)
#   pubsub    var.topics topic --our push subscription--> function
#             (google.cloud.pubsub.topic.v1.messagePublished, as Eventarc would send)
# Eventarc creates a Pub/Sub subscription of its own per trigger, which neither
# google_cloudfunctions2_function nor google_eventarc_trigger can give a
# dead-letter policy: scripts/eventarc-dead-letter.sh gives it the same policy
# as our push subscriptions after every change of the trigger
# (terraform_data.eventarc_dead_letter below; var.eventarc_dead_letter).
# After var.max_delivery_attempts failed deliveries, Pub/Sub moves the message to
# the dead-letter topic, as the local router does; `fedpipe events tail
# --project <p>` reads it from the -hold subscription.

locals {
  push_triggers = { for name, t in local.triggers : name => t if t.kind == "pubsub" }
}

resource "google_pubsub_subscription" "trigger" {
  for_each = local.push_triggers
  name     = "${var.name_prefix}-${each.key}"
  topic    = google_pubsub_topic.topic[each.value.topic].id
  labels   = merge(var.labels, { trigger = each.key })

  # A push waits for the function's answer up to the ack deadline: at least the
  # function's timeout, or a slow success would be redelivered.
  ack_deadline_seconds       = 600
  message_retention_duration = "604800s"

  push_config {
    # The path names the topic: functions-framework makes it the CloudEvent's source.
    push_endpoint = "${google_cloudfunctions2_function.fn[each.key].service_config[0].uri}/projects/${var.project}/topics/${each.value.topic}"
    oidc_token {
      service_account_email = google_service_account.delivery.email
      audience              = google_cloudfunctions2_function.fn[each.key].service_config[0].uri
    }
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.topic[var.topics.dead_letter].id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = "" # never expire for inactivity
  }

  depends_on = [
    google_cloud_run_service_iam_member.delivery_invokes_function,
    google_service_account_iam_member.pubsub_agent_signs_as_delivery,
    google_pubsub_topic_iam_member.pubsub_agent_dead_letters,
  ]
}

# Dead-lettering: Pub/Sub's agent publishes to the dead-letter topic and must be
# a subscriber of each source subscription (to acknowledge what it moved).
resource "google_pubsub_topic_iam_member" "pubsub_agent_dead_letters" {
  topic  = google_pubsub_topic.topic[var.topics.dead_letter].id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent_member
}

resource "google_pubsub_subscription_iam_member" "pubsub_agent_forwards_dead_letters" {
  for_each     = google_pubsub_subscription.trigger
  subscription = each.value.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent_member
}

# The dead letters are kept here (7 days, acked ones too) for `fedpipe events
# tail --project` and for replay; without a subscription they would be dropped.
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "${var.topics.dead_letter}-hold"
  topic                      = google_pubsub_topic.topic[var.topics.dead_letter].id
  message_retention_duration = "604800s" # 7 days, the maximum
  retain_acked_messages      = true
  ack_deadline_seconds       = 60
  labels                     = var.labels

  expiration_policy {
    ttl = ""
  }
}

# Each Eventarc trigger's subscription (storage and Firestore) belongs to
# Eventarc. Eventarc documents updating that subscription's retry settings; this
# gives it the same dead-letter policy after every change of the trigger (needs
# gcloud where terraform runs; set eventarc_dead_letter = false to skip, and the
# README says what is lost).
resource "terraform_data" "eventarc_dead_letter" {
  for_each = var.eventarc_dead_letter ? local.eventarc_triggers : {}

  triggers_replace = [
    google_cloudfunctions2_function.fn[each.key].event_trigger[0].trigger,
    google_pubsub_topic.topic[var.topics.dead_letter].id,
    var.max_delivery_attempts,
  ]

  provisioner "local-exec" {
    command = "${path.module}/scripts/eventarc-dead-letter.sh"
    environment = {
      EVENTARC_TRIGGER      = google_cloudfunctions2_function.fn[each.key].event_trigger[0].trigger
      DEAD_LETTER_TOPIC     = google_pubsub_topic.topic[var.topics.dead_letter].id
      MAX_DELIVERY_ATTEMPTS = tostring(var.max_delivery_attempts)
      PUBSUB_AGENT          = local.pubsub_agent_member
    }
  }

  depends_on = [google_pubsub_topic_iam_member.pubsub_agent_dead_letters]
}
