"""Galleries: enrolled templates on PostgreSQL with pgvector, searched 1:N.

A gallery belongs to one modality (vision or audio) and one embedding model;
each holds subjects, and each subject one or more templates (embeddings). No
image or audio is stored. Nothing here imports Celery or a model: the workers
(workers/galleries.py) and the ``ident gallery`` commands drive the same code.

    names.py       what a gallery name and a subject id may be
    embedded.py    the embedded PostgreSQL + pgvector under IDENT_DATA_DIR (pgserver)
    database.py    one process's connection: the vector-math check, reconnecting, typed errors
    migrations.py  the versioned schema, applied once under an advisory lock
    store.py       galleries and templates: enrol, identify (exact or HNSW), forget, list, stats
    transfer.py    export and import files
"""
