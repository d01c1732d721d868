"""Ray Serve classification service with class embeddings synced from the graph.

``ogclip_serve.app`` holds the FastAPI app, the autoscaling classifier deployment and the application builder
(``ogclip_serve.app:build_app``); ``ogclip_serve.gateway`` is the ingress in front of it, which sends a request
again to another replica when its replica dies; ``ogclip_serve.sync`` keeps each replica's class-embedding
snapshot in step with the graph; ``ogclip_serve.index`` is the faiss search; ``ogclip_serve.server`` runs it
locally (``ogclip serve up``). Importing this package imports neither Ray nor torch.
"""
