"""Personalization: training jobs that teach the base model a new concept, producing an adapter."""
