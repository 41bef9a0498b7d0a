"""Offline checks of the deployment artefacts in deploy/ (docs/deploy.md)."""
