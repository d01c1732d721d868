"""Ray Serve classification service with class embeddings synced from the graph."""
