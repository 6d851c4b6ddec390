"""metadist: distributed, exact, fast meta-training (MAML and family) for few-shot classification."""
__version__ = "0.1.0"
