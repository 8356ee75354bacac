"""Pictures of graphs, runs and searches (presentation): ``python -m drawing.draw PATH``."""
