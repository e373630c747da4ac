"""Serving: a BentoML service over an exported bundle (see service.py); the logic lives in model.py."""
