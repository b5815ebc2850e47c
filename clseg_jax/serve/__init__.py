"""HTTP service: users upload experiences and train lineages of continual-learning models."""
