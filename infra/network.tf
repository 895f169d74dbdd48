# The workers' network. The node API accepts internal traffic only, and a
# request from Cloud Run counts as internal only when it leaves through a VPC
# (Direct VPC egress) whose subnet has Private Google Access. So each worker job
# sends all its egress through a subnet in its node's region: it reaches Google
# APIs (Cloud Storage, KMS, the node API) and nothing on the internet (no NAT).

resource "google_compute_network" "workers" {
  name                    = "${var.name_prefix}-workers"
  auto_create_subnetworks = false

  depends_on = [google_project_service.api]
}

resource "google_compute_subnetwork" "workers" {
  for_each                 = local.node_region
  name                     = "${var.name_prefix}-workers-${each.key}"
  region                   = each.value
  network                  = google_compute_network.workers.id
  ip_cidr_range            = var.worker_subnet_cidrs[each.key]
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Workers take no inbound connections: say so explicitly (and log any attempt)
# rather than rely on the implied rule. Lowest priority but the implied rule's:
# GKE (accelerators.tf) opens what its clusters need (control plane to nodes, pod
# to pod) with rules of its own at priority 1000, which a deny at the same
# priority would override.
resource "google_compute_firewall" "workers_deny_ingress" {
  name      = "${var.name_prefix}-workers-deny-ingress"
  network   = google_compute_network.workers.id
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
