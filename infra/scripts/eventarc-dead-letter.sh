#!/usr/bin/env bash
# Give an Eventarc trigger's own Pub/Sub subscription a dead-letter policy
# (infra/delivery.tf, terraform_data.eventarc_dead_letter, run for each storage
# and Firestore trigger): Terraform cannot set one on the subscription Eventarc
# creates, and Eventarc documents updating it.
# Environment: EVENTARC_TRIGGER (projects/P/locations/L/triggers/T),
# DEAD_LETTER_TOPIC (projects/P/topics/T), MAX_DELIVERY_ATTEMPTS (5-100),
# PUBSUB_AGENT (serviceAccount:service-N@gcp-sa-pubsub.iam.gserviceaccount.com).
set -euo pipefail

: "${EVENTARC_TRIGGER:?}" "${DEAD_LETTER_TOPIC:?}" "${MAX_DELIVERY_ATTEMPTS:?}" "${PUBSUB_AGENT:?}"

subscription="$(gcloud eventarc triggers describe "${EVENTARC_TRIGGER}" --format='value(transport.pubsub.subscription)')"
if [[ -z "${subscription}" ]]; then
  echo "eventarc-dead-letter: ${EVENTARC_TRIGGER} has no Pub/Sub transport subscription" >&2
  exit 1
fi

# Pub/Sub's agent acknowledges what it moves to the dead-letter topic.
gcloud pubsub subscriptions add-iam-policy-binding "${subscription}" \
  --member="${PUBSUB_AGENT}" --role=roles/pubsub.subscriber --condition=None >/dev/null
gcloud pubsub subscriptions update "${subscription}" \
  --dead-letter-topic="${DEAD_LETTER_TOPIC}" \
  --max-delivery-attempts="${MAX_DELIVERY_ATTEMPTS}"
echo "eventarc-dead-letter: ${subscription} -> ${DEAD_LETTER_TOPIC} after ${MAX_DELIVERY_ATTEMPTS} attempts"
