"""Drift reports that compare recent traffic with the training set."""
