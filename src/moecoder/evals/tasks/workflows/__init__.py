"""Workflow tasks."""
