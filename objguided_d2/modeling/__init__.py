"""Modules registered in detectron2's registries."""
