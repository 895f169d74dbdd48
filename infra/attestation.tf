# Key release to attested workers (infra/README.md, "Key release to attested workers").
#
# Per node: a workload identity pool whose one provider trusts Confidential Space
# attestation tokens, admits only those whose claims satisfy the node's key-release
# policy, and whose principal set may use the node's key-encryption key (KEK: open the
# node's shards, seal its weight updates; main.tf) and, with confidential workers, sign
# with the node's update-signing key. The policy is
# declared once, in shared/key_release.py (CEL clauses over `assertion`), and rendered
# per node by Python: var.key_release carries the rendered string, which this file uses
# untouched, byte for byte the expression the local key broker evaluates
# (tests/unit/test_key_release.py checks both). Expiry is STS's to check; nonce
# freshness is not expressible here (the local broker checks it; see the README).

locals {
  # The node's own KEK (main.tf), in the node's region: never another node's, never a data (CMEK) key.
  key_release_data_key = { for node, _ in var.key_release : node => google_kms_crypto_key.kek[node].id }
}

resource "google_project_service" "attestation" {
  for_each           = length(var.key_release) > 0 ? toset(["confidentialcomputing.googleapis.com", "sts.googleapis.com", "iamcredentials.googleapis.com"]) : toset([])
  service            = each.value
  disable_on_destroy = false
}

resource "google_iam_workload_identity_pool" "attested" {
  for_each                  = var.key_release
  workload_identity_pool_id = "${var.name_prefix}-${each.key}-attested"
  display_name              = "fedpipe ${each.key} attested workers"
  description               = "Confidential Space workloads allowed to use node ${each.key}'s KEK"

  lifecycle {
    precondition {
      condition     = contains(keys(var.nodes), each.key)
      error_message = "key_release names node ${each.key}, which is not in var.nodes."
    }
  }

  depends_on = [google_project_service.api, google_project_service.attestation]
}

resource "google_iam_workload_identity_pool_provider" "attested" {
  for_each                           = var.key_release
  workload_identity_pool_id          = google_iam_workload_identity_pool.attested[each.key].workload_identity_pool_id
  workload_identity_pool_provider_id = "attestation-verifier"
  display_name                       = "Confidential Space"
  # The node's key-release policy, rendered by shared/key_release.py: do not edit here.
  attribute_condition = var.key_release[each.key].attribute_condition

  attribute_mapping = {
    "google.subject"         = "assertion.sub"
    "attribute.image_digest" = "assertion.submods.container.image_digest"
    "attribute.hwmodel"      = "assertion.hwmodel"
  }

  oidc {
    issuer_uri = "https://confidentialcomputing.googleapis.com/"
    # The worker asks the launcher for a token with the node's audience (and the
    # condition checks `assertion.aud` too): another node's token is refused twice.
    allowed_audiences = [var.key_release[each.key].audience]
  }
}

# Everything the pool admits may encrypt and decrypt with the node's KEK (workers open
# their node's shards and seal their updates), and nothing else of ours.
resource "google_kms_crypto_key_iam_member" "attested_uses_kek" {
  for_each      = var.key_release
  crypto_key_id = local.key_release_data_key[each.key]
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.attested[each.key].name}/*"
}

# With confidential workers, the node's update-signing key (main.tf) is released the same way:
# the signer role belongs to the node's pool, and the worker signs with its pool's STS
# credentials (workers/trainer/signing_key.py), never as its service account. A node without
# a key-release policy then has no signer at all: its workers' updates go unsigned, and a
# federation that requires signatures refuses them (nothing is released without attestation).
resource "google_kms_crypto_key_iam_member" "attested_signs_updates" {
  for_each      = var.confidential_workers ? var.key_release : {}
  crypto_key_id = google_kms_crypto_key.signing[each.key].id
  role          = "roles/cloudkms.signer"
  member        = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.attested[each.key].name}/*"
}
