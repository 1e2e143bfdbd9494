"""The placement planner: which tensor goes where, within the GPU budget (see docs/ARCHITECTURE.md)."""
