"""vtcbench: benchmark and profile visual token compression in LLaVA-family models."""
