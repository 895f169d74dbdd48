# VPC Service Controls (README, "VPC Service Controls"): a service perimeter around
# the deployment's project and the services that hold or move its data, so that a
# stolen credential cannot copy a bucket, a document or a key out to a project of
# its own, and nothing outside reaches in except the identities named here.
#
# A perimeter needs an organization (its access policy) and is made by someone
# allowed to edit that policy, so it exists only when vpc_sc_access_policy is set.
# Perimeters contain projects, not regions, and a project belongs to one regular
# perimeter: the hub and every node region of this deployment share its project,
# so they share one perimeter (a node in a project of its own would get its own).
# Data stays in its region by what each resource's location says (main.tf).
#
# Dry run first (the default): violations are logged ("VPC Service Controls" audit
# logs) and nothing is refused; set vpc_sc_dry_run = false once the logs are clean.

variable "vpc_sc_access_policy" {
  description = "The organization's Access Context Manager policy number (gcloud access-context-manager policies list --organization ORG); null = no perimeter."
  type        = string
  default     = null

  validation {
    condition     = var.vpc_sc_access_policy == null || can(regex("^[0-9]+$", coalesce(var.vpc_sc_access_policy, "-")))
    error_message = "vpc_sc_access_policy: the policy's number (accessPolicies/<number>), digits only."
  }
}

variable "vpc_sc_dry_run" {
  description = "Keep the perimeter in dry-run mode (violations logged, nothing refused). Turn off once the dry-run logs show no fedpipe traffic refused."
  type        = bool
  default     = true
}

variable "vpc_sc_ingress_identities" {
  description = "Who may call the perimeter's services from outside it: the operators who deploy and run the `fedpipe` CLI, the people or pipelines who upload data (user:, group:, serviceAccount:)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.vpc_sc_ingress_identities : can(regex("^(user|group|serviceAccount|principal|principalSet):", m))])
    error_message = "vpc_sc_ingress_identities: IAM members (user:..., group:..., serviceAccount:..., principal://..., principalSet://...)."
  }
}

locals {
  vpc_sc_enabled = var.vpc_sc_access_policy != null

  # The services whose data the perimeter keeps in: buckets, documents, topics, keys,
  # the functions and jobs that read them, and every accelerator backend.
  vpc_sc_restricted_services = [
    "aiplatform.googleapis.com",
    "artifactregistry.googleapis.com",
    "batch.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudkms.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "datastore.googleapis.com",
    "eventarc.googleapis.com",
    "firestore.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
  ]

  # Perimeter ids are letters, digits and '_' only.
  vpc_sc_perimeter_id = replace("${var.name_prefix}_${var.project}", "-", "_")

  # Who comes in from outside, to what:
  #   operators and uploaders (vpc_sc_ingress_identities): every restricted service;
  #   Cloud Scheduler's agent (outside the perimeter): the tick, Pub/Sub only.
  vpc_sc_ingress = concat(
    length(var.vpc_sc_ingress_identities) == 0 ? [] : [
      { title = "fedpipe operators and uploaders", identities = var.vpc_sc_ingress_identities, services = ["*"] },
    ],
    [
      {
        title      = "Cloud Scheduler publishes the tick"
        identities = ["serviceAccount:service-${data.google_project.this.number}@gcp-sa-cloudscheduler.iam.gserviceaccount.com"]
        services   = ["pubsub.googleapis.com"]
      },
    ],
  )
}

# Access Context Manager bills its quota to this project (versions.tf, user_project_override).
resource "google_project_service" "vpc_sc" {
  for_each           = local.vpc_sc_enabled ? toset(["accesscontextmanager.googleapis.com"]) : toset([])
  service            = each.value
  disable_on_destroy = false
}

resource "google_access_context_manager_service_perimeter" "fedpipe" {
  count          = local.vpc_sc_enabled ? 1 : 0
  parent         = "accessPolicies/${var.vpc_sc_access_policy}"
  name           = "accessPolicies/${var.vpc_sc_access_policy}/servicePerimeters/${local.vpc_sc_perimeter_id}"
  title          = "${var.name_prefix} ${var.project}"
  description    = "fedpipe: the hub and every node region of project ${var.project}"
  perimeter_type = "PERIMETER_TYPE_REGULAR"

  # Dry run: the configuration is the `spec` and only logged; enforced: it is the `status`.
  use_explicit_dry_run_spec = var.vpc_sc_dry_run

  depends_on = [google_project_service.vpc_sc]

  dynamic "spec" {
    for_each = var.vpc_sc_dry_run ? [1] : []
    content {
      resources           = ["projects/${data.google_project.this.number}"]
      restricted_services = local.vpc_sc_restricted_services

      dynamic "ingress_policies" {
        for_each = local.vpc_sc_ingress
        content {
          title = ingress_policies.value.title
          ingress_from {
            identities = ingress_policies.value.identities
            sources {
              access_level = "*"
            }
          }
          ingress_to {
            resources = ["*"]
            dynamic "operations" {
              for_each = ingress_policies.value.services
              content {
                service_name = operations.value
                # "*" (every service) takes no method selector; a named service, all its methods.
                dynamic "method_selectors" {
                  for_each = operations.value == "*" ? [] : ["*"]
                  content {
                    method = method_selectors.value
                  }
                }
              }
            }
          }
        }
      }
    }
  }

  dynamic "status" {
    for_each = var.vpc_sc_dry_run ? [] : [1]
    content {
      resources           = ["projects/${data.google_project.this.number}"]
      restricted_services = local.vpc_sc_restricted_services

      dynamic "ingress_policies" {
        for_each = local.vpc_sc_ingress
        content {
          title = ingress_policies.value.title
          ingress_from {
            identities = ingress_policies.value.identities
            sources {
              access_level = "*"
            }
          }
          ingress_to {
            resources = ["*"]
            dynamic "operations" {
              for_each = ingress_policies.value.services
              content {
                service_name = operations.value
                # "*" (every service) takes no method selector; a named service, all its methods.
                dynamic "method_selectors" {
                  for_each = operations.value == "*" ? [] : ["*"]
                  content {
                    method = method_selectors.value
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

output "vpc_sc_perimeter" {
  description = "The service perimeter (null without vpc_sc_access_policy), and whether it is only a dry run."
  value = local.vpc_sc_enabled ? {
    name     = google_access_context_manager_service_perimeter.fedpipe[0].name
    dry_run  = var.vpc_sc_dry_run
    services = local.vpc_sc_restricted_services
  } : null
}
