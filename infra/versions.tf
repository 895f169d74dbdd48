terraform {
  # optional() object attributes in variable types need Terraform 1.3+.
  required_version = ">= 1.5"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.44 made `node_selector` (GPU) on google_cloud_run_v2_job GA.
      version = "~> 6.44"
    }
    google-beta = {
      # Only for google_project_service_identity (service agents), beta-only in 6.x.
      source  = "hashicorp/google-beta"
      version = "~> 6.44"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "~> 2.4"
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
