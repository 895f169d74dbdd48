terraform {
  # optional() object attributes in variable types need Terraform 1.3+.
  required_version = ">= 1.5"

  # State lives in a versioned Cloud Storage bucket of the operator's (README, "Remote state"):
  # terraform init -backend-config="bucket=<state bucket>" -backend-config="prefix=fedpipe".
  # Checks that need no state: terraform init -backend=false.
  backend "gcs" {}

  required_providers {
    # Each pinned at the version whose schema tests/unit/test_infra_schema.py checks every
    # argument and block against (tests/data/terraform_provider_schema.json, extracted by
    # scripts/extract_schema.py): raise a pin together with a new extract.
    google = {
      source = "hashicorp/google"
      # 6.50.0: the schema checked (6.44 made `node_selector` (GPU) on google_cloud_run_v2_job GA).
      version = "~> 6.50"
    }
    google-beta = {
      # Only for google_project_service_identity (service agents), beta-only in 6.x.
      source  = "hashicorp/google-beta"
      version = "~> 6.50"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "~> 2.7"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region

  # The Billing Budgets API refuses user credentials without a quota project;
  # bill API quota to the deployment's own project.
  user_project_override = true
  billing_project       = var.project
}

provider "google-beta" {
  project = var.project
  region  = var.region
}
