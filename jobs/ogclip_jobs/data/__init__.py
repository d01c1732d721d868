"""The curation pipeline on Ray Data: ingest → dedup → quality filter → masks → captions → training shards."""
