"""OG-CLIP jobs: training, evaluation, the pipeline runner and the ``ogclip`` command line."""
