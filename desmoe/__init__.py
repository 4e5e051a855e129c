"""desmoe: expert-parallel MoE training that learns many domains or tasks without forgetting."""
__version__ = "0.1.0"
