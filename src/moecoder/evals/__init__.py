"""Evaluation in layers: task data -> generation backends -> sandboxed execution -> metrics -> report."""
