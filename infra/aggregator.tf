# The attested aggregator (README, "Attested aggregation"): for federations with
# confidential_aggregation, the hub's admission and aggregation of training updates run in a
# Confidential Space workload of their own (workers/aggregator), so that neither the hub's
# functions nor its operator can open a single node's update. Off unless
# var.attested_aggregation, which needs confidential workers (the nodes' attested workers
# are what check the aggregator's token and seal to its key).
#
#   one Confidential Space VM (AMD SEV-SNP on N2D, the hardened image family) in the hub's
#   region, running var.aggregator_image by digest, as its own service account; no external
#   IP, in a network of its own (<prefix>-hub) whose one way in is its HTTP port, from the
#   hub functions' Serverless VPC Access connector (the hub's functions and the node API
#   egress to private addresses through it). It reads updates, reads and creates global
#   models and server state in the hub bucket, and seals under the hub's KEK; nothing else.
#
# The hub functions learn where it is (FEDPIPE_AGGREGATOR_URL, main.tf local.hub_function_env);
# each node's workers learn which aggregator images their node trusts
# (FEDPIPE_AGGREGATOR_IMAGE_DIGESTS, main.tf local.worker_env).

variable "attested_aggregation" {
  description = "Run the attested aggregator (a Confidential Space VM in the hub's region) for federations with confidential_aggregation. Needs confidential_workers and aggregator_image."
  type        = bool
  default     = false
}

variable "aggregator_image" {
  description = "The aggregator image (workers/aggregator), pinned by digest: REGISTRY/PATH@sha256:<64 hex>. Nodes seal updates only to an aggregator whose attested image digest they trust, and a tag can move."
  type        = string
  default     = null

  validation {
    condition     = var.aggregator_image == null || can(regex("^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+@sha256:[0-9a-f]{64}$", var.aggregator_image))
    error_message = "aggregator_image must be pinned by digest: REGISTRY/PATH@sha256:<64 lowercase hex>, no tag."
  }
}

variable "aggregator_image_digests" {
  description = "Per node: the aggregator image digests (sha256:<64 hex>) its workers trust to seal updates to (FEDPIPE_AGGREGATOR_IMAGE_DIGESTS). A node not named trusts aggregator_image's digest only; an empty list trusts none (its confidential federations' uploads fail)."
  type        = map(list(string))
  default     = {}

  validation {
    condition     = alltrue([for digests in values(var.aggregator_image_digests) : alltrue([for d in digests : can(regex("^sha256:[0-9a-f]{64}$", d))])])
    error_message = "aggregator_image_digests: lists of sha256:<64 lowercase hex> digests."
  }
}

variable "aggregator_zone" {
  description = "Zone of the aggregator VM, in the hub's region, where N2D machines run SEV-SNP; null = <region>-a."
  type        = string
  default     = null
}

variable "aggregator_machine_type" {
  description = "Machine type of the aggregator VM: an n2d-* type (AMD SEV-SNP). It holds a round's updates one by one and a few models."
  type        = string
  default     = "n2d-standard-4"
}

variable "aggregator_cidrs" {
  description = "IP ranges of the hub network (attested_aggregation only): the aggregator's subnet, and the /28 of the hub functions' VPC connector. Must not overlap worker_subnet_cidrs or gke_cidrs."
  type = object({
    aggregator = string
    connector  = string
  })
  default = {
    aggregator = "10.9.0.0/28"
    connector  = "10.9.0.16/28"
  }

  validation {
    condition     = can(cidrhost(var.aggregator_cidrs.aggregator, 0)) && can(regex("/28$", var.aggregator_cidrs.connector))
    error_message = "aggregator_cidrs: IPv4 CIDR ranges, the connector's a /28 (Serverless VPC Access)."
  }
}

locals {
  # functions-framework's default port (workers/aggregator: `functions-framework --target aggregator_api`):
  # fixed, so the image's launch policy need not allow a PORT override.
  aggregator_port = 8080
  aggregator_zone = coalesce(var.aggregator_zone, "${var.region}-a")

  # Its private address, reserved, so the URL (the audience of the hub's ID tokens, which the
  # aggregator checks byte for byte) stays the same when the VM is replaced.
  aggregator_url = var.attested_aggregation ? "http://${google_compute_address.aggregator[0].address}:${local.aggregator_port}" : null

  # The hub's functions and the node API: where the aggregator is, and who the hub is (its only caller).
  hub_aggregator_env = var.attested_aggregation ? {
    FEDPIPE_AGGREGATOR_URL = local.aggregator_url
    FEDPIPE_HUB_IDENTITY   = google_service_account.hub.email
  } : {}
  hub_vpc_connector = var.attested_aggregation ? google_vpc_access_connector.hub[0].id : null

  # Each node's trusted aggregator images: its own list, else the deployed image's digest.
  aggregator_image_digest    = var.aggregator_image == null ? "" : split("@", var.aggregator_image)[1]
  aggregator_trusted_digests = { for node, _ in var.nodes : node => lookup(var.aggregator_image_digests, node, [local.aggregator_image_digest]) }

  # The hub bucket's objects it may touch (shared/federation.py): every node's updates
  # (updates/<node>/...), read only; global models and server-optimizer state
  # (federations/<fid>/global/..., the only objects under federations/), read (the previous
  # round's, for clipping, server optimizers and privacy) and created, never overwritten.
  aggregator_bucket_roles = var.attested_aggregation ? {
    "updates-read"       = { role = "roles/storage.objectViewer", prefix = "updates/" }
    "federations-read"   = { role = "roles/storage.objectViewer", prefix = "federations/" }
    "federations-create" = { role = "roles/storage.objectCreator", prefix = "federations/" }
  } : {}
}

resource "google_project_service" "aggregator" {
  # Confidential Computing is confidential_workers' (confidential.tf), which this requires.
  for_each           = var.attested_aggregation ? toset(["vpcaccess.googleapis.com"]) : toset([])
  service            = each.value
  disable_on_destroy = false
}

resource "google_service_account" "aggregator" {
  count        = var.attested_aggregation ? 1 : 0
  account_id   = "${var.name_prefix}-aggregator"
  display_name = "fedpipe attested aggregator (Confidential Space)"

  lifecycle {
    precondition {
      condition     = var.confidential_workers
      error_message = "attested_aggregation needs confidential_workers: the nodes' attested workers check the aggregator and seal to it."
    }
    precondition {
      condition     = var.aggregator_image != null
      error_message = "attested_aggregation needs aggregator_image (the aggregator pinned by digest)."
    }
    precondition {
      condition     = alltrue([for node in keys(var.aggregator_image_digests) : contains(keys(var.nodes), node)])
      error_message = "aggregator_image_digests names a node that is not in var.nodes."
    }
  }

  depends_on = [google_project_service.api]
}

# ---------------------------------------------------------------------------
# The hub network: the aggregator's subnet and the functions' connector, nothing else
# ---------------------------------------------------------------------------

resource "google_compute_network" "hub" {
  count                   = var.attested_aggregation ? 1 : 0
  name                    = "${var.name_prefix}-hub"
  auto_create_subnetworks = false

  depends_on = [google_project_service.api]
}

# Private Google Access: the VM reaches Cloud Storage, Cloud KMS, Confidential Computing,
# Logging and Artifact Registry (its image) without an external IP or NAT.
resource "google_compute_subnetwork" "aggregator" {
  count                    = var.attested_aggregation ? 1 : 0
  name                     = "${var.name_prefix}-aggregator"
  region                   = var.region
  network                  = google_compute_network.hub[0].id
  ip_cidr_range            = var.aggregator_cidrs.aggregator
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_address" "aggregator" {
  count        = var.attested_aggregation ? 1 : 0
  name         = "${var.name_prefix}-aggregator"
  region       = var.region
  subnetwork   = google_compute_subnetwork.aggregator[0].id
  address_type = "INTERNAL"
  purpose      = "GCE_ENDPOINT"
}

# The hub's functions (those of the hub's triggers and the node API) send traffic for private
# addresses through it (vpc_connector_egress_settings = PRIVATE_RANGES_ONLY, main.tf); its
# instances take their addresses from this /28, which the firewall below admits.
resource "google_vpc_access_connector" "hub" {
  count         = var.attested_aggregation ? 1 : 0
  name          = "${var.name_prefix}-hub"
  region        = var.region
  network       = google_compute_network.hub[0].name
  ip_cidr_range = var.aggregator_cidrs.connector
  machine_type  = "e2-micro"
  min_instances = 2
  max_instances = 3

  depends_on = [google_project_service.aggregator]
}

# Nothing comes in (and any attempt is logged) but what the rule below admits. Google's own
# rules for the connector's health checks, which Serverless VPC Access creates, have priority 1000.
resource "google_compute_firewall" "hub_deny_ingress" {
  count     = var.attested_aggregation ? 1 : 0
  name      = "${var.name_prefix}-hub-deny-ingress"
  network   = google_compute_network.hub[0].id
  direction = "INGRESS"
  priority  = 65534

  deny {
    protocol = "all"
  }
  source_ranges = ["0.0.0.0/0"]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# The aggregator's HTTP port, from the hub functions' connector only, to the VM that runs as the
# aggregator's identity only. The aggregator itself admits only the hub identity's ID tokens.
resource "google_compute_firewall" "hub_functions_reach_aggregator" {
  count     = var.attested_aggregation ? 1 : 0
  name      = "${var.name_prefix}-hub-to-aggregator"
  network   = google_compute_network.hub[0].id
  direction = "INGRESS"
  priority  = 1000

  allow {
    protocol = "tcp"
    ports    = [tostring(local.aggregator_port)]
  }
  source_ranges           = [var.aggregator_cidrs.connector]
  target_service_accounts = [google_service_account.aggregator[0].email]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# ---------------------------------------------------------------------------
# The VM
# ---------------------------------------------------------------------------

# Confidential Space reads its metadata at boot: a new image is a new VM (and a new key, which the
# nodes check and seal their next round's updates to), at the same reserved address.
resource "terraform_data" "aggregator_image" {
  count = var.attested_aggregation ? 1 : 0
  input = var.aggregator_image
}

resource "google_compute_instance" "aggregator" {
  count            = var.attested_aggregation ? 1 : 0
  name             = "${var.name_prefix}-aggregator"
  description      = "fedpipe attested aggregator: Confidential Space workload ${var.aggregator_image}"
  zone             = local.aggregator_zone
  machine_type     = var.aggregator_machine_type
  min_cpu_platform = "AMD Milan"
  labels           = merge(var.labels, { kind = "aggregator" })

  # A new machine type needs a stop: the aggregator restarts with a new key, and the nodes seal
  # their next round's updates to it.
  allow_stopping_for_update = true

  confidential_instance_config {
    confidential_instance_type = "SEV_SNP"
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  # SEV-SNP guests cannot live-migrate: maintenance stops the VM and Compute starts it again.
  scheduling {
    on_host_maintenance = "TERMINATE"
    automatic_restart   = true
  }

  # The hardened Confidential Space image (not confidential-space-debug: no SSH, and its tokens
  # say dbgstat = disabled-since-boot, which the nodes' policies require).
  boot_disk {
    initialize_params {
      image = "projects/confidential-space-images/global/images/family/confidential-space"
      type  = "pd-balanced"
      size  = 20
    }
  }

  # No access_config: no external IP.
  network_interface {
    subnetwork = google_compute_subnetwork.aggregator[0].id
    network_ip = google_compute_address.aggregator[0].address
  }

  service_account {
    email  = google_service_account.aggregator[0].email
    scopes = ["cloud-platform"]
  }

  # What the aggregator reads (shared.config.Settings.from_env): the project and bucket prefix
  # (the hub bucket's name; empty = the project), its own URL and the hub's identity, and the
  # hub's KEK only (it opens global models and server state, and seals the aggregate, under it;
  # updates are sealed to its own key, shared/attested_seal.py). The image's launch policy must
  # allow exactly these five tee-env-* names (README, "Attested aggregation").
  metadata = {
    "tee-image-reference"            = var.aggregator_image
    "tee-restart-policy"             = "Always"
    "tee-container-log-redirect"     = "cloud_logging"
    "tee-env-FEDPIPE_PROJECT"        = var.project
    "tee-env-FEDPIPE_BUCKET_PREFIX"  = lookup(var.settings_env, "FEDPIPE_BUCKET_PREFIX", "")
    "tee-env-FEDPIPE_AGGREGATOR_URL" = local.aggregator_url
    "tee-env-FEDPIPE_HUB_IDENTITY"   = google_service_account.hub.email
    "tee-env-FEDPIPE_NODE_KEKS"      = format("%s=gcp-kms://%s", "hub", google_kms_crypto_key.kek["hub"].id)
    "block-project-ssh-keys"         = "true"
  }

  lifecycle {
    precondition {
      condition     = startswith(local.aggregator_zone, "${var.region}-")
      error_message = "aggregator_zone ${local.aggregator_zone} must be a zone of the hub's region ${var.region}."
    }
    precondition {
      condition     = startswith(var.aggregator_machine_type, "n2d-")
      error_message = "aggregator_machine_type ${var.aggregator_machine_type} cannot run SEV-SNP: use an n2d-* type."
    }
    replace_triggered_by = [terraform_data.aggregator_image[count.index]]
  }

  # It uses its key and the hub bucket from its first request on.
  depends_on = [
    google_project_iam_member.aggregator,
    google_kms_crypto_key_iam_member.aggregator_uses_hub_kek,
    google_storage_bucket_iam_member.aggregator,
    google_artifact_registry_repository_iam_member.aggregator_pulls_image,
  ]
}

# ---------------------------------------------------------------------------
# Grants (README, "Attested aggregation")
# ---------------------------------------------------------------------------

resource "google_storage_bucket_iam_member" "aggregator" {
  for_each = local.aggregator_bucket_roles
  bucket   = google_storage_bucket.hub.name
  role     = each.value.role
  member   = "serviceAccount:${google_service_account.aggregator[0].email}"

  condition {
    title       = "only ${each.value.prefix}"
    description = "fedpipe attested aggregator: objects under ${each.value.prefix} only"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.hub.name}/objects/${each.value.prefix}\")"
  }
}

# Global models and server state are sealed under the hub's KEK: the aggregator opens the
# previous round's and seals the new one. No node's KEK: updates are sealed to its own key.
resource "google_kms_crypto_key_iam_member" "aggregator_uses_hub_kek" {
  for_each      = var.attested_aggregation ? toset(["hub"]) : toset([])
  crypto_key_id = google_kms_crypto_key.kek["hub"].id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${google_service_account.aggregator[0].email}"
}

# Project-level only, neither reads data: the launcher's attestation token, and the container's logs.
resource "google_project_iam_member" "aggregator" {
  for_each = var.attested_aggregation ? toset(["roles/confidentialcomputing.workloadUser", "roles/logging.logWriter"]) : toset([])
  project  = var.project
  role     = each.value
  member   = "serviceAccount:${google_service_account.aggregator[0].email}"
}

# The Confidential Space launcher pulls the image as the VM's identity: from fedpipe's image
# repository (code, no data), where the deploy guide pushes it.
resource "google_artifact_registry_repository_iam_member" "aggregator_pulls_image" {
  for_each   = var.attested_aggregation ? toset(["images"]) : toset([])
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.aggregator[0].email}"
}

output "aggregator_url" {
  description = "The attested aggregator's URL (its reserved private address and port): FEDPIPE_AGGREGATOR_URL of the hub's functions and of the aggregator, the audience of the hub's ID tokens; null unless attested_aggregation."
  value       = local.aggregator_url
}

output "aggregator" {
  description = "The attested aggregator's VM, zone, identity, image and each node's trusted digests (README, \"Attested aggregation\": what to check on the first deploy); null unless attested_aggregation."
  value = var.attested_aggregation ? {
    instance        = google_compute_instance.aggregator[0].name
    zone            = local.aggregator_zone
    service_account = google_service_account.aggregator[0].email
    image           = var.aggregator_image
    trusted_digests = { for node, digests in local.aggregator_trusted_digests : node => join(",", digests) }
  } : null
}
