"""Prediction: out-of-fold and test maps of a trained experiment."""
